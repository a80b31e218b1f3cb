"""Side-by-side prefill/decode benchmark: sdpa vs the tokenmem attention with statistics vs eager attention weights.

What is measured
----------------
A tiny-but-real Llama (8 layers, hidden 512, 8 query heads, 2 KV heads, MLP 1408, vocab 8192,
``max_position_embeddings`` 40000) is built from a ``LlamaConfig`` with random weights
(``torch.manual_seed(0)``, fp32, eval mode, nothing is downloaded). Three configurations are compared:

(a) ``sdpa``: ``attn_implementation="sdpa"``, ``cache=DynamicCache()``, no statistics
    (the transformers baseline);
(b) ``tokenmem``: ``mem = tokenmem.TokenMemory(model, "full", record_stats=True)`` (switches the model to
    the ``"tokenmem"`` attention, which also computes the per-key attention mass of every layer on the
    CPU kernel backend), ``cache=mem``;
(c) ``eager``: ``attn_implementation="eager"``, ``output_attentions=True`` (the usual way to get attention
    statistics from transformers: every layer's ``[heads, q, n]`` weights are materialised and returned).

Prefill: one forward call over the whole random prompt (batch 1, ``use_cache=True``, under
``torch.inference_mode()``), timed with ``time.perf_counter`` after one untimed warm-up forward on a
256-token prompt (with its own, discarded cache). ``logits_to_keep=1`` is passed in every configuration
(as ``generate`` does for a prefill), so the ``tokens x vocab`` logits (1 GiB at 32k) do not dilute the
memory comparison; ``--all-logits`` turns that off.

Each (context, configuration) runs in a FRESH child process (this file re-invoked with ``--child``),
so that the peak RSS is that configuration's own: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read in
the child after the run (it covers the whole life of the child: imports, model construction, warm-up
and the prefill). The child also reports its RSS right after model construction (``VmRSS``), so the
table shows both the raw peak and the increment ``peak - RSS after construction`` (what the forward
call itself needed), each with its ratio to (a).

Decode: in the children of the ``--decode-context`` prefill (16k by default) of (a) and (b), after the
prefill, ``--decode-warmup`` untimed and then ``--decode-steps`` timed greedy decode steps
(``model(input_ids=next_token, cache=cache)`` + argmax); the median ms/token of these is
reported. A decode step is only a few ms of work split over two OpenMP threads, so another process on the
machine slows it by a large factor (a thread waits for a descheduled peer at every parallel region); the
CPU stall (see Load below) is therefore recorded per step, decoding goes on (up to ``--decode-max-steps``)
until ``--decode-steps`` "quiet" steps (stall below ``--quiet-stall``) were seen, and the median of the
quiet steps is reported next to it (the decode target is evaluated on both).

Eager at long contexts does not fit in memory: with ``output_attentions=True`` transformers keeps the
weights of *all* layers until the forward returns, i.e. ``layers x heads x q x n x 4 B`` (64 GiB at 16k,
256 GiB at 32k), plus one more layer-sized buffer in flight while a layer's softmax is computed. That
prediction is made before the run: if it exceeds ``MemAvailable`` (``/proc/meminfo``) the run is skipped
and reported as ``OOM (predicted N GiB of attention weights)``. Every child also caps its address space
(``RLIMIT_AS`` = its size after imports + 90 % of ``MemAvailable``), so an unexpected real OOM becomes a
``MemoryError``/allocation failure reported as OOM instead of the machine being driven into the OOM killer.

Correctness checks printed with the table: the maximum absolute difference of the last-token logits of
(b) and (c) vs (a) (same weights, same prompt), and for (b) the total attention mass recorded in layer 0
(must equal the number of queries: every query's softmax row sums to 1).

Load: the machine may be shared. ``/proc/loadavg`` (1-minute) is read before and after every child run
and shown in the table, with the CPU stall during the timed prefill: the increase of the ``some`` total
of ``/proc/pressure/cpu`` divided by the prefill's wall time (time during which some task, ours or
another process's, was runnable but waited for a CPU; near 0 % on an idle machine). The notes also give
the prefill's process CPU time (user + sys, both threads), and for decode the fastest step and the
stall during the decode loop; the configurations of one context run back to back (and ``--repeat N`` runs
the whole sequence N times, alternating the order, and reports the median) so they see similar conditions.

Triton: a child with ``TRITON_INTERPRET=1`` runs ``tokenmem.kernels.triton_backend.attention_with_stats`` on small
random CPU tensors (b=2, hq=8, hkv=2, q=n=65, d=32, causal, left padding on batch row 1, need_mass,
rows of the newest 8 queries) and reports the normwise error ``max|triton - ref| / max|ref|`` of out,
mass and rows vs ``tokenmem.kernels.reference`` on the same inputs (float32 and bfloat16).

Usage::

    python benchmarks/attention.py                           # contexts 4096,16384,32768; decode at 16384
    python benchmarks/attention.py --quick                   # contexts 1024,2048; decode at 2048 (smoke)
    python benchmarks/attention.py --out attention_bench.md  # also write the markdown report to a file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

RESULT_MARK = "@@RESULT@@ "
CONFIGS = ("sdpa", "tokenmem", "eager")
LABELS = {
    "sdpa": "(a) sdpa + DynamicCache, no stats",
    "tokenmem": "(b) tokenmem + TokenMemory(full, record_stats)",
    "eager": "(c) eager + output_attentions",
}
MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=40000)
WARMUP_TOKENS = 256
GIB = 1 << 30
MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# /proc helpers (shared by parent and child)
# ---------------------------------------------------------------------------------------------
def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def meminfo(field: str = "MemAvailable") -> int:
    """A /proc/meminfo field in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/meminfo")


def cpu_stall_us() -> int | None:
    """Total microseconds some task waited for a CPU (``/proc/pressure/cpu``), None without PSI."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def proc_status(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmSize, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def eager_prediction(context: int) -> tuple[int, int]:
    """(bytes of attention weights returned by eager + output_attentions, predicted extra peak bytes).

    All ``layers`` weight tensors ``[1, heads, q, n]`` fp32 stay alive until the forward returns; while a
    layer runs, one more layer-sized buffer is in flight (``matmul * scaling`` / ``+ mask`` / softmax each
    allocate a new one, the previous is freed when the next exists), plus the 4D causal mask."""
    L, H = MODEL["num_hidden_layers"], MODEL["num_attention_heads"]
    per_layer = H * context * context * 4
    weights = L * per_layer
    extra = weights + per_layer + context * context * 5  # + float mask (4 B) and its bool source (1 B)
    return weights, extra


# ---------------------------------------------------------------------------------------------
# Child: one configuration at one context
# ---------------------------------------------------------------------------------------------
def child_main(spec: dict) -> dict:
    import gc
    import resource

    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import tokenmem

    res: dict = {"config": spec["config"], "context": spec["context"], "status": "ok"}
    # address-space cap: what the process maps after its imports + (most of) the available memory
    vm_now = proc_status("VmSize")
    cap = vm_now + int(spec["as_budget"])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    res["as_cap_gib"] = cap / GIB
    res["threads"] = torch.get_num_threads()

    config_name, ctx = spec["config"], spec["context"]
    torch.manual_seed(0)
    attn = "eager" if config_name == "eager" else "sdpa"
    config = LlamaConfig(**MODEL, tie_word_embeddings=False)
    config._attn_implementation = attn
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attn)
    model = model.to(torch.float32).eval()
    gc.collect()
    res["rss_built_mib"] = proc_status("VmRSS") / MIB
    res["maxrss_built_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if config_name == "tokenmem":  # build / load the compiled mass kernel before anything is timed
        from tokenmem.kernels import native

        res["mass_path"] = "compiled colmass.cpp" if native.load() is not None else "PyTorch (transposed flash)"

    def make_cache():
        if config_name == "tokenmem":
            return tokenmem.TokenMemory(model, "full", record_stats=True)
        return DynamicCache()

    extra = {"output_attentions": True} if config_name == "eager" else {}
    if not spec.get("all_logits"):
        extra["logits_to_keep"] = 1
    gen = torch.Generator().manual_seed(1234)
    warm_ids = torch.randint(0, MODEL["vocab_size"], (1, WARMUP_TOKENS), generator=gen)
    ids = torch.randint(0, MODEL["vocab_size"], (1, ctx), generator=torch.Generator().manual_seed(ctx))

    try:
        with torch.inference_mode():
            model(input_ids=warm_ids, **tokenmem.cache_kwargs(model, make_cache()), use_cache=True, **extra)
            gc.collect()
            cache = make_cache()
            if config_name == "tokenmem":
                assert model.config._attn_implementation == "tokenmem", model.config._attn_implementation
            ru0, stall0 = resource.getrusage(resource.RUSAGE_SELF), cpu_stall_us()
            t0 = time.perf_counter()
            out = model(input_ids=ids, **tokenmem.cache_kwargs(model, cache), use_cache=True, **extra)
            res["prefill_s"] = time.perf_counter() - t0
            ru1, stall1 = resource.getrusage(resource.RUSAGE_SELF), cpu_stall_us()
            res["prefill_cpu_s"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
            if stall0 is not None and stall1 is not None:
                res["prefill_stall"] = (stall1 - stall0) / 1e6 / res["prefill_s"]
            res["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            last = out.logits[0, -1].float().clone()
            torch.save(last, spec["logits_path"])
            if config_name == "eager":
                att = out.attentions
                res["attn_returned_gib"] = sum(a.numel() * a.element_size() for a in att) / GIB
                res["attn_layers"] = len(att)
            if config_name == "tokenmem":
                from tokenmem.kernels import native

                if hasattr(native, "pool_stats"):  # the compiled kernel's thread pool (older tokenmem: none)
                    res["pool"] = native.pool_stats()
                mass = cache.layers[0].mass
                res["mass_shape"] = list(mass.shape)
                res["mass_sum_per_head"] = (mass.double().sum(-1) / ctx).flatten().tolist()  # should be 1.0
            next_tok = out.logits[:, -1:].argmax(-1)
            del out
            steps = int(spec.get("decode_steps", 0))
            if steps:
                quiet_max, max_steps = float(spec["quiet_stall"]), max(steps, int(spec["decode_max_steps"]))
                times, stalls = [], []
                for _ in range(int(spec["decode_warmup"])):
                    out = model(input_ids=next_tok, **tokenmem.cache_kwargs(model, cache), use_cache=True)
                    next_tok = out.logits[:, -1:].argmax(-1)
                # the first `steps` steps always count; more (up to max_steps) only while fewer than `steps`
                # of all steps were quiet (CPU stall below quiet_max: no other process competed)
                while len(times) < steps or (sum(x < quiet_max for x in stalls) < steps and len(times) < max_steps):
                    stall0, t0 = cpu_stall_us(), time.perf_counter()
                    out = model(input_ids=next_tok, **tokenmem.cache_kwargs(model, cache), use_cache=True)
                    next_tok = out.logits[:, -1:].argmax(-1)
                    dt = time.perf_counter() - t0
                    stall1 = cpu_stall_us()
                    times.append(dt)
                    stalls.append((stall1 - stall0) / 1e6 / dt if stall0 is not None and stall1 is not None else 0.0)
                res["decode_ms"] = statistics.median(times[:steps]) * 1e3
                res["decode_min_ms"] = min(times) * 1e3
                res["decode_stall"] = statistics.mean(stalls[:steps])
                quiet = [t for t, x in zip(times, stalls) if x < quiet_max]
                res["decode_quiet_n"] = len(quiet)
                res["decode_total_n"] = len(times)
                res["decode_quiet_ms"] = statistics.median(quiet) * 1e3 if len(quiet) >= max(4, steps // 2) else None
                res["decode_ms_all"] = [round(t * 1e3, 1) for t in times]
                res["decode_stall_all"] = [round(100 * x) for x in stalls]
                res["maxrss_after_decode_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (MemoryError, RuntimeError) as exc:  # RLIMIT_AS turns a real OOM into one of these
        text = str(exc)
        if isinstance(exc, MemoryError) or "alloc" in text.lower() or "memory" in text.lower():
            res["status"] = "OOM"
            res["error"] = f"{type(exc).__name__}: {text[:200]}"
            res["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        else:
            raise
    return res


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------
def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    load_before = loadavg()
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": spec["config"], "context": spec["context"], "status": f"timeout ({timeout:.0f} s)",
                "load": (load_before, loadavg())}
    res = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
    if res is None:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        if proc.returncode < 0:
            status = f"killed (signal {-proc.returncode})"
        else:
            status = f"failed (exit {proc.returncode})"
        res = {"config": spec["config"], "context": spec["context"], "status": status, "error": " | ".join(tail)}
    res["load"] = (load_before, loadavg())
    res["wall_s"] = time.time() - t0
    return res


def fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def ratio(x, base):
    return None if x is None or base is None or base == 0 else x / base


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(runs: list[dict]) -> dict:
    """Median over repeats of the numeric fields (status of the first failing run otherwise)."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[0]
    agg = dict(ok[0])
    for key in ("prefill_s", "maxrss_mib", "rss_built_mib", "decode_ms", "decode_quiet_ms"):
        agg[key] = median_or_none([r.get(key) for r in ok])
    agg["load"] = (min(r["load"][0] for r in ok), max(r["load"][1] for r in ok)) if len(ok) > 1 else ok[0]["load"]
    agg["repeats"] = len(ok)
    agg["prefill_all"] = [r.get("prefill_s") for r in ok]
    return agg


def triton_check() -> list[str]:
    """Run the Triton kernels in the interpreter on small CPU tensors vs the reference (in a child)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tokenmem", "kernels", "triton_backend.py")
    if not os.path.exists(path):
        return [f"- `tokenmem/kernels/triton_backend.py` is missing ({path}): no Triton agreement check."]
    code = r'''
import json, torch
import tokenmem.kernels.triton_backend as tk
from tokenmem.kernels import reference
assert tk._INTERPRETED, "TRITON_INTERPRET=1 did not take effect"
def err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
out = {}
b, hq, hkv, q, n, d, r = 2, 8, 2, 65, 65, 32, 8
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(b, hq, q, d, generator=g).to(dtype)
    key = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    value = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :7] = False  # left padding on batch row 1
    kw = dict(scaling=d ** -0.5, causal=True, key_valid=valid[:, None, :], query_valid=valid[:, -q:], need_mass=True)
    rows_t = torch.full((b, hkv, r, n), float("nan"))
    rows_r = torch.full((b, hkv, r, n), float("nan"))
    o_t, m_t = tk.attention_with_stats(query, key, value, rows=rows_t, **kw)
    o_r, m_r = reference.attention_with_stats(query, key, value, rows=rows_r, **kw)
    name = str(dtype).removeprefix("torch.")
    out[name] = {"out": err(o_t, o_r), "mass": err(m_t, m_r), "rows": err(rows_t, rows_r),
                 "finite": bool(torch.isfinite(o_t).all() and torch.isfinite(m_t).all() and torch.isfinite(rows_t).all())}
print("@@RESULT@@ " + json.dumps(out))
'''
    env = dict(os.environ, TRITON_INTERPRET="1")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        return ["- Triton interpreter check: timed out after 900 s."]
    res = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
    if res is None:
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
        return [f"- `tokenmem/kernels/triton_backend.py` exists but the interpreter check failed (exit {proc.returncode}): {tail}"]
    lines = ["Triton interpreter (`TRITON_INTERPRET=1`) vs `tokenmem.kernels.reference`, b=2 hq=8 hkv=2 q=n=65 d=32, "
             "causal, left padding (7 tokens) on row 1, need_mass, rows of the newest 8 queries; error = "
             "max|triton - ref| / max|ref| (reference on the same inputs):", "",
             "| dtype | out | mass | rows | all finite |", "|---|---|---|---|---|"]
    for dtype, e in res.items():
        lines.append(f"| {dtype} | {e['out']:.2e} | {e['mass']:.2e} | {e['rows']:.2e} | {e['finite']} |")
    return lines


def build_report(args, results: dict, available: int, started: str, triton_lines: list[str]) -> str:
    import torch
    import transformers

    lines = [
        "# Attention benchmark: sdpa vs tokenmem (stats) vs eager (output_attentions)",
        "",
        f"Started {started}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"MemTotal {meminfo('MemTotal') / GIB:.1f} GiB, MemAvailable at start {available / GIB:.1f} GiB.",
        f"Model: Llama 8 layers, hidden 512, 8 heads / 2 KV heads, MLP 1408, vocab 8192, fp32, random weights (seed 0). "
        f"Prefill = one forward over the whole prompt (batch 1, use_cache, "
        f"{'all logits' if args.all_logits else 'logits_to_keep=1'}), after a {WARMUP_TOKENS}-token warm-up; "
        f"each row a fresh process; repeats: {args.repeat} (median). Decode: median of {args.decode_steps} steps "
        f"(after {args.decode_warmup} untimed) at {args.decode_context} context.",
        "",
        "| context | configuration | prefill s | × (a) | peak RSS MiB | × (a) | RSS after build MiB | "
        "peak − build MiB | × (a) | decode ms/token | × (a) | load 1m before→after, CPU stall | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for ctx in args.contexts:
        base = results.get((ctx, "sdpa"))
        base_ok = base is not None and base.get("status") == "ok"
        b_t = base["prefill_s"] if base_ok else None
        b_rss = base["maxrss_mib"] if base_ok else None
        b_inc = (base["maxrss_mib"] - base["rss_built_mib"]) if base_ok else None
        b_dec = base.get("decode_ms") if base_ok else None
        for name in args.configs:
            r = results.get((ctx, name))
            if r is None:
                continue
            load = r.get("load")
            load_txt = f"{load[0]:.2f}→{load[1]:.2f}" if load else "–"
            notes = []
            if r.get("status") != "ok":
                status = r.get("status")
                if r.get("error") and not status.startswith("OOM (predicted"):
                    notes.append(r["error"][:160].replace("|", "/"))
                lines.append(f"| {ctx} | {LABELS[name]} | {status} | | {fmt(r.get('maxrss_mib'), '.0f')} | | "
                             f"{fmt(r.get('rss_built_mib'), '.0f')} | | | | | {load_txt} | {'; '.join(notes)} |")
                continue
            inc = r["maxrss_mib"] - r["rss_built_mib"]
            if r.get("prefill_stall") is not None:
                load_txt += f", stall {100 * r['prefill_stall']:.0f}%"
            if r.get("prefill_cpu_s") is not None:
                notes.append(f"prefill CPU {r['prefill_cpu_s']:.1f} s")
            if r.get("decode_min_ms") is not None:
                notes.append(f"decode: mean stall of the first {args.decode_steps} steps "
                             f"{100 * r.get('decode_stall', 0):.0f}%, min {r['decode_min_ms']:.1f} ms, median of the "
                             f"{r['decode_quiet_n']}/{r['decode_total_n']} quiet steps (stall < "
                             f"{100 * args.quiet_stall:.0f}%) {fmt(r.get('decode_quiet_ms'), '.1f')} ms")
            if r.get("logit_diff") is not None:
                notes.append(f"max abs Δlogit vs (a) {r['logit_diff']:.1e}")
            if r.get("mass_sum_per_head") is not None:
                m = r["mass_sum_per_head"]
                notes.append(f"layer-0 mass/q {min(m):.4f}..{max(m):.4f}")
            if r.get("mass_path"):
                pool = r.get("pool")
                notes.append(f"mass pass: {r['mass_path']}" + (
                    f" (thread pool of {pool['size']}, {pool['started']} worker started)" if pool else ""))
            if r.get("attn_returned_gib") is not None:
                w, _ = eager_prediction(ctx)
                notes.append(f"returned {r['attn_layers']} attention tensors {r['attn_returned_gib']:.2f} GiB "
                             f"(predicted {w / GIB:.2f})")
            if r.get("repeats", 1) > 1:
                notes.append("prefill runs " + ", ".join(f"{t:.1f}" for t in r["prefill_all"]))
            dec = r.get("decode_ms")
            lines.append(
                f"| {ctx} | {LABELS[name]} | {fmt(r['prefill_s'])} | {fmt(ratio(r['prefill_s'], b_t))} | "
                f"{r['maxrss_mib']:.0f} | {fmt(ratio(r['maxrss_mib'], b_rss))} | {r['rss_built_mib']:.0f} | "
                f"{inc:.0f} | {fmt(ratio(inc, b_inc))} | {fmt(dec, '.1f')} | {fmt(ratio(dec, b_dec))} | "
                f"{load_txt} | {'; '.join(notes)} |")
    lines += ["", "## Targets", ""]
    long_ctx = [c for c in args.contexts if c >= 16384] or list(args.contexts)
    for ctx in long_ctx:
        a, b = results.get((ctx, "sdpa")), results.get((ctx, "tokenmem"))
        if not (a and b and a.get("status") == "ok" and b.get("status") == "ok"):
            lines.append(f"- {ctx}: (a) or (b) did not complete: cannot evaluate")
            continue
        rt = b["prefill_s"] / a["prefill_s"]
        rm = b["maxrss_mib"] / a["maxrss_mib"]
        ri = (b["maxrss_mib"] - b["rss_built_mib"]) / max(1e-9, a["maxrss_mib"] - a["rss_built_mib"])
        lines.append(f"- {ctx}: (b) peak memory within 1.3x of (a): raw peak {rm:.2f}x "
                     f"{'MET' if rm <= 1.3 else 'MISSED'}; increment over post-construction RSS {ri:.2f}x "
                     f"{'MET' if ri <= 1.3 else 'MISSED'}")
        lines.append(f"- {ctx}: (b) prefill time within 1.5x of (a): {rt:.2f}x {'MET' if rt <= 1.5 else 'MISSED'}")
    a, b = results.get((args.decode_context, "sdpa")), results.get((args.decode_context, "tokenmem"))
    if a and b and a.get("decode_ms") and b.get("decode_ms"):
        rd = b["decode_ms"] / a["decode_ms"]
        lines.append(f"- decode at {args.decode_context} (median of the first {args.decode_steps} steps): (b) "
                     f"{b['decode_ms']:.1f} ms vs (a) {a['decode_ms']:.1f} ms per token = {rd:.2f}x, within 1.2x: "
                     f"{'MET' if rd <= 1.2 else 'MISSED'}")
        if a.get("decode_quiet_ms") and b.get("decode_quiet_ms"):
            rq = b["decode_quiet_ms"] / a["decode_quiet_ms"]
            lines.append(f"- decode at {args.decode_context} (median of the quiet steps, CPU stall < "
                         f"{100 * args.quiet_stall:.0f}%): (b) {b['decode_quiet_ms']:.1f} ms vs (a) "
                         f"{a['decode_quiet_ms']:.1f} ms = {rq:.2f}x, within 1.2x: {'MET' if rq <= 1.2 else 'MISSED'}")
        else:
            lines.append(f"- decode at {args.decode_context}: too few quiet steps (CPU stall < "
                         f"{100 * args.quiet_stall:.0f}%) in (a) or (b) for a load-free comparison")
        for tag, r in (("(a)", a), ("(b)", b)):
            lines.append(f"  - per-step ms {tag}: {r.get('decode_ms_all')}; CPU stall %: {r.get('decode_stall_all')}")
    else:
        lines.append(f"- decode at {args.decode_context}: not measured")
    if args.contexts and not any(c >= 16384 for c in args.contexts):
        lines.append("- (quick run: the targets are defined at 16k/32k; evaluated here at the contexts run)")
    lines += ["", "## Triton", ""] + triton_lines
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="prompt lengths (default 4096,16384,32768; --quick: 1024,2048)")
    p.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--decode-context", type=int, default=None, help="context of the decode measurement "
                   "(default 16384; --quick: the largest context)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--decode-max-steps", type=int, default=64,
                   help="keep decoding (up to this many timed steps) until --decode-steps quiet steps were seen")
    p.add_argument("--quiet-stall", type=float, default=0.10,
                   help="a decode step is 'quiet' when the CPU stall (PSI) during it is below this fraction")
    p.add_argument("--repeat", type=int, default=1, help="run every (context, configuration) N times (median)")
    p.add_argument("--all-logits", action="store_true", help="compute logits for every prompt token")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton interpreter check")
    p.add_argument("--quick", action="store_true", help="small contexts (1024,2048) for a smoke run")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        res = child_main(json.loads(args.child))
        print(RESULT_MARK + json.dumps(res), flush=True)
        return

    if args.contexts is None:
        args.contexts = [1024, 2048] if args.quick else [4096, 16384, 32768]
    if args.decode_context is None:
        args.decode_context = max(args.contexts) if args.quick else 16384
    for name in args.configs:
        if name not in CONFIGS:
            p.error(f"unknown configuration {name!r}; choose from {CONFIGS}")
    started = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
    available_start = meminfo()
    tmp = tempfile.mkdtemp(prefix="tokenmem_attn_bench_")
    runs: dict = {}
    for ctx in args.contexts:
        for rep in range(args.repeat):
            order = list(args.configs) if rep % 2 == 0 else list(reversed(args.configs))
            for name in order:
                available = meminfo()
                spec = {"config": name, "context": ctx, "as_budget": int(0.9 * available),
                        "logits_path": os.path.join(tmp, f"{name}_{ctx}.pt"), "all_logits": args.all_logits,
                        "decode_steps": args.decode_steps if (ctx == args.decode_context and name != "eager") else 0,
                        "decode_warmup": args.decode_warmup, "decode_max_steps": args.decode_max_steps,
                        "quiet_stall": args.quiet_stall}
                if name == "eager":
                    weights, extra = eager_prediction(ctx)
                    if extra > available:
                        res = {"config": name, "context": ctx,
                               "status": f"OOM (predicted {weights / GIB:.1f} GiB of attention weights, "
                                         f"{extra / GIB:.1f} GiB peak > {available / GIB:.1f} GiB available)",
                               "load": (loadavg(), loadavg())}
                        log(f"{ctx} {name}: skipped, {res['status']}")
                        runs.setdefault((ctx, name), []).append(res)
                        continue
                log(f"{ctx} {name} (repeat {rep + 1}/{args.repeat}): starting, load {loadavg():.2f}, "
                    f"MemAvailable {available / GIB:.1f} GiB")
                res = run_child(spec, args.timeout)
                log(f"{ctx} {name}: {res.get('status')} prefill {fmt(res.get('prefill_s'))} s, peak RSS "
                    f"{fmt(res.get('maxrss_mib'), '.0f')} MiB (built {fmt(res.get('rss_built_mib'), '.0f')}), decode "
                    f"{fmt(res.get('decode_ms'), '.1f')} ms, load {res['load'][0]:.2f}->{res['load'][1]:.2f}"
                    + (f" error: {res.get('error')}" if res.get("error") else ""))
                runs.setdefault((ctx, name), []).append(res)
    import torch

    results = {key: aggregate(value) for key, value in runs.items()}
    for ctx in args.contexts:  # logits of (b)/(c) vs (a): same weights, same prompt
        base = results.get((ctx, "sdpa"))
        if not base or base.get("status") != "ok":
            continue
        ref = torch.load(os.path.join(tmp, f"sdpa_{ctx}.pt"))
        for name in ("tokenmem", "eager"):
            r = results.get((ctx, name))
            path = os.path.join(tmp, f"{name}_{ctx}.pt")
            if r and r.get("status") == "ok" and os.path.exists(path):
                r["logit_diff"] = (torch.load(path) - ref).abs().max().item()
    triton_lines = ["(skipped: --no-triton)"] if args.no_triton else triton_check()
    report = build_report(args, results, available_start, started, triton_lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
