"""Side-by-side decode benchmark: DynamicCache vs TokenMemory (full / sink / h2o), per-token time and KV bytes.

What is measured
----------------
A tiny-but-real Llama (8 layers, hidden 512, 8 query heads, 2 KV heads, MLP 1408, vocab 8192) is built
from a ``LlamaConfig`` with random weights (``torch.manual_seed(0)``, fp32, eval mode, nothing is
downloaded). Two model objects hold identical weights: one stays on transformers' ``sdpa`` attention
and is only ever used with a ``DynamicCache``; the other is handed to ``tokenmem.TokenMemory`` (which
switches *that* model's attention to ``"tokenmem"``).

For every context length the same random prompt is fed to four cache setups:

1. ``DynamicCache`` + sdpa (the transformers baseline),
2. ``TokenMemory(evictor="full")`` (no eviction: the cost of the tokenmem attention path alone),
3. ``TokenMemory(evictor="sink", budget=1024, interval=64)``,
4. ``TokenMemory(evictor="h2o", budget=1024, interval=64)``.

Each setup first prefills the context in chunks (``--chunk`` tokens per forward call with
``cache=cache``; a TokenMemory evicts at the end of every chunk when over budget). Prefill is
*not* part of the measured number. Then a hand-written greedy loop
``out = model(input_ids=next_token, cache=cache, use_cache=True)`` (+ argmax) runs under
``torch.inference_mode()``: ``--warmup`` untimed steps, then ``--steps`` recorded steps, each timed
with ``time.perf_counter``. The steps of the four setups are interleaved round-robin (one step of each
setup per round, the order rotated every round), so that all four see the same machine conditions;
``--sequential`` times each setup's steps back to back instead. The table reports the *median*
per-token time, plus the mean (which includes the occasional decode-time eviction, every ``interval``
steps for the budgeted memories) and the minimum.

On a shared machine another process competing for the cores slows a decode step by a large factor
(the two OpenMP threads wait for each other). The benchmark therefore watches the Linux CPU pressure
(``/proc/pressure/cpu``): a step during which some task waited for a CPU for more than ``--max-stall``
of the step's time is not recorded, and the rounds go on until every setup has ``--steps`` recorded
steps or ``--patience`` seconds have passed (then contended steps count too, and the report says so).
Unrecorded steps still decode tokens, so the caches grow beyond ``context + warmup + steps``; the
"held tokens/layer" column shows the final size.

KV bytes are read after the last step: for the DynamicCache the sum of ``keys.nbytes + values.nbytes``
over layers; for a TokenMemory ``memory.stats()["kv_bytes"]`` (held keys and values), and
``stats()["bytes"]`` (every allocated buffer: key/value capacity, packed metadata, evictor state,
attention mass) in the "alloc MiB" column.

Usage::

    python benchmarks/decode.py                      # contexts 1024,4096,16384
    python benchmarks/decode.py --quick              # 512,1024, fewer steps (smoke test)
    python benchmarks/decode.py --out decode.md      # also write the markdown report to a file
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import tokenmem
from tokenmem.evictor_list import add_evictors_argument

BASELINE = "DynamicCache (sdpa)"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def build_config(max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def build_models(max_positions: int) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """Two fp32 eval-mode Llamas with identical random weights: (sdpa model, model for tokenmem)."""
    torch.manual_seed(0)
    config = build_config(max_positions)
    sdpa_model = LlamaForCausalLM(copy.deepcopy(config))
    sdpa_model.set_attn_implementation("sdpa")
    sdpa_model = sdpa_model.to(torch.float32).eval()

    tm_model = LlamaForCausalLM(copy.deepcopy(config))
    tm_model.load_state_dict(sdpa_model.state_dict())
    tm_model = tm_model.to(torch.float32).eval()
    for a, b in zip(sdpa_model.state_dict().values(), tm_model.state_dict().values()):
        assert torch.equal(a, b)
    return sdpa_model, tm_model


# ---------------------------------------------------------------------------------------------
# One cache setup
# ---------------------------------------------------------------------------------------------
class Setup:
    def __init__(self, name: str, model, make_cache):
        self.name = name
        self.model = model
        self.make_cache = make_cache
        self.cache = None
        self.next_token = None
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.prefill_s = 0.0

    def prefill(self, ids: torch.Tensor, chunk: int) -> None:
        self.cache = self.make_cache()
        self.times, self.tokens = [], []
        start = time.perf_counter()
        out = None
        for s in range(0, ids.shape[1], chunk):
            out = self.model(
                input_ids=ids[:, s : s + chunk], **tokenmem.cache_kwargs(self.model, self.cache), use_cache=True,
                logits_to_keep=1,
            )
        self.next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        self.prefill_s = time.perf_counter() - start
        del out

    def step(self) -> float:
        """One greedy decode step; returns its wall time in seconds."""
        t0 = time.perf_counter()
        out = self.model(input_ids=self.next_token, **tokenmem.cache_kwargs(self.model, self.cache), use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        dt = time.perf_counter() - t0
        self.next_token = nxt
        return dt

    def is_tokenmem(self) -> bool:
        return isinstance(self.cache, tokenmem.TokenMemory)

    def kv(self) -> tuple[int, int, str]:
        """(KV bytes, allocated bytes, held tokens per layer)."""
        if self.is_tokenmem():
            s = self.cache.stats()
            held = s["held"]
            txt = str(held[0]) if min(held) == max(held) else f"{min(held)}-{max(held)}"
            return s["kv_bytes"], s["bytes"], txt
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)
        held = sorted({layer.keys.shape[-2] for layer in self.cache.layers})
        txt = str(held[0]) if len(held) == 1 else f"{held[0]}-{held[-1]}"
        return kv, kv, txt

    def release(self) -> None:
        self.cache = None
        self.next_token = None


def make_setups(sdpa_model, tm_model, budget: int, interval: int, evictors=("sink", "h2o")) -> list[Setup]:
    setups = [
        Setup(BASELINE, sdpa_model, lambda: DynamicCache()),
        Setup("TokenMemory full", tm_model, lambda: tokenmem.TokenMemory(tm_model, evictor="full")),
    ]
    for name in evictors:  # one budgeted setup per evictor ("full" is always the second setup)
        if name != "full":
            setups.append(Setup(budgeted_name(name, budget), tm_model,
                                lambda name=name: tokenmem.TokenMemory(tm_model, evictor=name, budget=budget,
                                                                       interval=interval)))
    # Creating a TokenMemory prepares (switches) its model; make sure the baseline model is untouched.
    for s in setups[1:]:
        s.make_cache()
    assert sdpa_model.config._attn_implementation == "sdpa", sdpa_model.config._attn_implementation
    assert tm_model.config._attn_implementation == "tokenmem", tm_model.config._attn_implementation
    assert not hasattr(sdpa_model, "_tokenmem_context")
    return setups


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process)."""
    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), busy, time.process_time()


def foreign_load(start, end) -> float:
    """Average number of CPU cores busy with *other* processes between two snapshots (NaN if unknown)."""
    wall = end[0] - start[0]
    if wall <= 0:
        return float("nan")
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall)


def cpu_stall_us() -> int | None:
    """Cumulative microseconds during which some runnable task waited for a CPU (Linux PSI), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def run_context(setups: list[Setup], context: int, args, vocab: int) -> dict:
    """Prefill and time all setups at one context; returns what the machine did meanwhile.

    Decode runs in rounds (interleaved: one step of every setup, the order rotated each round;
    ``--sequential``: the steps of one setup after another). A step during which some task waited for a
    CPU for more than ``--max-stall`` of its wall time (Linux CPU pressure: another process competed for
    the cores) is not recorded; rounds continue until every setup has ``--steps`` recorded steps, or
    ``--patience`` seconds have passed, after which contended steps are recorded too (the report says so).
    """
    gen = torch.Generator().manual_seed(1000 + context)
    ids = torch.randint(0, vocab, (1, context), generator=gen)
    for s in setups:
        s.prefill(ids, args.chunk)
        log(f"  [{context}] prefilled {s.name}: {s.prefill_s:.1f}s")

    def rounds():
        if args.sequential:
            for s in setups:
                for _ in range(args.warmup):
                    yield [s], False
                while len(s.times) < args.steps:
                    yield [s], True
        else:
            n = len(setups)
            for i in range(args.warmup):
                yield setups[i % n :] + setups[: i % n], False
            i = args.warmup
            while any(len(s.times) < args.steps for s in setups):
                yield setups[i % n :] + setups[: i % n], True
                i += 1

    discarded = forced = 0
    stall_time = recorded_time = 0.0
    before = cpu_snapshot()
    deadline = time.monotonic() + args.patience
    for order, timed in rounds():
        for s in order:
            p0 = cpu_stall_us()
            dt = s.step()
            p1 = cpu_stall_us()
            if not timed:
                continue
            s.tokens.append(int(s.next_token))
            if len(s.times) >= args.steps:  # this setup has enough; it keeps stepping alongside the others
                continue
            stall = min(1.0, (p1 - p0) / (1e6 * dt)) if p0 is not None and p1 is not None else 0.0
            if stall > args.max_stall:
                if time.monotonic() < deadline:
                    discarded += 1
                    continue
                forced += 1
            s.times.append(dt)
            stall_time += stall * dt
            recorded_time += dt
    load = foreign_load(before, cpu_snapshot())
    info = {
        "discarded": discarded,
        "forced": forced,
        "stall": stall_time / recorded_time if recorded_time else 0.0,
        "load": load,
    }
    for s in setups:
        log(f"  [{context}] {s.name}: median {1e3 * statistics.median(s.times):.2f} ms/token")
    log(
        f"  [{context}] steps discarded for CPU contention: {discarded}, contended steps recorded after the "
        f"patience ran out: {forced}; CPU stall in recorded steps {100 * info['stall']:.1f}%; other processes "
        f"used {load:.2f} cores on average"
    )
    return info


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def mib(n: int) -> float:
    return n / 2**20


def source_revision() -> str:
    """The git commit of the tokenmem checkout being measured (``+dirty`` with uncommitted changes)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(tokenmem.__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "tokenmem", "plugins", "adapters"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def kernel_backend() -> str:
    try:
        from tokenmem import kernels

        name = kernels.backend_for(torch.device("cpu"))
        kernels.backend(name)  # import it now, together with the revision read
        return name
    except (ImportError, AttributeError, tokenmem.TokenmemError):
        return "unknown"


def header(args, contexts, revision: str, backend: str) -> list[str]:
    cfg = build_config(0)
    return [
        "# tokenmem decode benchmark",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, tokenmem {tokenmem.__version__}, "
        f"python {platform.python_version()}; tokenmem source at git {revision}, CPU kernel backend "
        f"{backend!r}",
        f"- CPU: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"torch.get_num_threads()={torch.get_num_threads()} (default, not changed)",
        f"- model: LlamaForCausalLM from config, random weights (seed 0), fp32, eval; {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, "
        f"MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}",
        f"- contexts {', '.join(map(str, contexts))}; prefill in chunks of {args.chunk} (not timed); "
        f"{args.warmup} warm-up + {args.steps} recorded greedy decode steps per setup, "
        f"{'sequential' if args.sequential else 'interleaved round-robin'}; ms/token = median of the recorded steps; "
        f"steps with CPU stall > {100 * args.max_stall:.0f}% not recorded (patience {args.patience:.0f}s per context)",
        f"- budgeted memories: budget={args.budget} tokens per layer and KV head, interval={args.interval}",
        "",
    ]


def table(results: list[dict]) -> list[str]:
    cols = [
        "context",
        "cache",
        "ms/token",
        "ratio vs DynamicCache (time)",
        "KV MiB",
        "ratio vs DynamicCache (KV)",
        "held tokens/layer",
        "alloc MiB (stats()['bytes'])",
        "mean ms/token",
        "min ms/token",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if i != 1 else ":---" for i in range(len(cols))) + "|"]
    for r in results:
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["context"]),
                    r["cache"],
                    f"{r['ms']:.2f}",
                    f"{r['time_ratio']:.2f}x",
                    f"{mib(r['kv']):.2f}",
                    f"{r['kv_ratio']:.3f}x",
                    r["held"],
                    f"{mib(r['alloc']):.2f}",
                    f"{r['mean_ms']:.2f}",
                    f"{r['min_ms']:.2f}",
                ]
            )
            + " |"
        )
    return lines


def budgeted_name(evictor: str, budget: int) -> str:
    return f"TokenMemory {evictor} b={budget}"


def targets(results: list[dict], contexts: list[int], args, agreement: dict, machine: dict) -> list[str]:
    by = {(r["context"], r["cache"]): r for r in results}
    full = "TokenMemory full"
    budgeted = [budgeted_name(name, args.budget) for name in args.evictors if name != "full"]
    out = ["", "## Targets", ""]

    # 1. no-eviction overhead <= 10%
    parts, ok_all = [], True
    for c in contexts:
        over = by[(c, full)]["ms"] / by[(c, BASELINE)]["ms"] - 1.0
        ok = over <= 0.10
        ok_all &= ok
        parts.append(f"{c}: {100 * over:+.1f}% ({'ok' if ok else 'MISSED'})")
    out.append(
        f"- no-eviction overhead <= 10% (TokenMemory(full) vs DynamicCache ms/token): {'; '.join(parts)} "
        f"=> **{'MET' if ok_all else 'MISSED'}**"
    )

    # 2. at 16k: budget decode >= 3x faster, KV bytes flat as context grows
    target_ctx = 16384
    if target_ctx in contexts:
        parts, ok_speed = [], True
        for name in budgeted:
            speedup = by[(target_ctx, BASELINE)]["ms"] / by[(target_ctx, name)]["ms"]
            ok = speedup >= 3.0
            ok_speed &= ok
            parts.append(f"{name.split()[1]} {speedup:.2f}x ({'ok' if ok else 'MISSED'})")
        speed_txt = f"{'; '.join(parts)} => **{'MET' if ok_speed else 'MISSED'}**"
    else:
        ok_speed = None
        big = max(contexts)
        parts = [f"{n.split()[1]} {by[(big, BASELINE)]['ms'] / by[(big, n)]['ms']:.2f}x" for n in budgeted]
        speed_txt = f"not evaluated (16384 not among the contexts; at {big}: {'; '.join(parts)})"
    # flat: once the context exceeds the budget, the held KV stops growing: it never exceeds the KV of
    # (budget + interval) tokens, i.e. max/min over those contexts <= (budget + interval) / budget.
    over = [c for c in contexts if c >= args.budget]
    parts, ok_flat = [], True
    for name in budgeted:
        kvs = [by[(c, name)]["kv"] for c in over]
        ok = len(kvs) >= 2 and max(kvs) / min(kvs) <= (args.budget + args.interval) / args.budget
        ok_flat &= ok
        parts.append(f"{name.split()[1]} " + "/".join(f"{mib(k):.2f}" for k in kvs) + f" MiB ({'ok' if ok else 'MISSED'})")
    if len(over) >= 2:
        flat_txt = (
            f"{'; '.join(parts)} at contexts {'/'.join(map(str, over))} "
            f"(flat = max/min <= (budget+interval)/budget) => **{'MET' if ok_flat else 'MISSED'}**"
        )
    else:
        ok_flat = None
        flat_txt = f"not evaluated (fewer than two contexts >= budget {args.budget})"
    overall = "n/a" if ok_speed is None or ok_flat is None else ("MET" if ok_speed and ok_flat else "MISSED")
    out.append(
        f"- at 16k, budget-{args.budget} decode >= 3x faster per token than DynamicCache, KV bytes flat as context "
        f"grows => **{overall}**"
    )
    out.append(f"  - speed at 16k (DynamicCache ms / budgeted ms): {speed_txt}")
    out.append(f"  - KV bytes: {flat_txt}")

    out += ["", "## Sanity", ""]
    for c in contexts:
        same, total = agreement[c]
        out.append(f"- greedy tokens TokenMemory(full) vs DynamicCache at {c}: {same}/{total} identical")
    for c in contexts:
        m = machine[c]
        note = (
            f"; patience ran out, {m['forced']} contended steps were recorded too: times are noisy" if m["forced"] else ""
        )
        out.append(
            f"- CPU contention at {c}: {m['discarded']} decode steps not recorded (CPU stall > "
            f"{100 * args.max_stall:.0f}% of the step); stall in recorded steps {100 * m['stall']:.1f}%; other "
            f"processes used {m['load']:.2f} of {os.cpu_count()} cores on average during the decode phase{note}"
        )
    return out


def parse_contexts(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--contexts expects comma-separated ints, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--contexts expects positive ints, got {text!r}")
    return values


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=parse_contexts, default=None, help="comma-separated context lengths "
                   "(default 1024,4096,16384; 512,1024 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: contexts 512,1024 and fewer decode steps")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per setup (default 64; 16 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up decode steps (default 4; 2 with --quick)")
    p.add_argument("--chunk", type=int, default=1024, help="prefill tokens per forward call (default 1024)")
    p.add_argument("--budget", type=int, default=1024, help="budget of the sink/h2o memories (default 1024)")
    p.add_argument("--interval", type=int, default=64, help="eviction interval of the sink/h2o memories (default 64)")
    p.add_argument("--sequential", action="store_true", help="time each setup's steps back to back instead of "
                   "interleaving the four setups round-robin")
    p.add_argument("--max-stall", type=float, default=0.10, help="do not record decode steps during which some task "
                   "waited for a CPU for more than this fraction of the time (Linux /proc/pressure/cpu; default 0.10)")
    p.add_argument("--patience", type=float, default=600.0, help="seconds per context to wait for uncontended steps "
                   "before recording contended ones too (default 600)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    add_evictors_argument(p, help="evictors of the budgeted setups (registered names; default: every registered "
                          "one; DynamicCache and TokenMemory full always run)")
    args = p.parse_args(argv)

    contexts = args.contexts or ([512, 1024] if args.quick else [1024, 4096, 16384])
    args.steps = args.steps if args.steps is not None else (16 if args.quick else 64)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 4)
    if args.steps < 1 or args.warmup < 0 or args.chunk < 1:
        p.error("--steps must be >= 1, --warmup >= 0, --chunk >= 1")

    revision, backend = source_revision(), kernel_backend()  # the measured code is what is imported now
    max_positions = max(32768, 2 * max(contexts))  # discarded rounds decode extra tokens
    sdpa_model, tm_model = build_models(max_positions)
    setups = make_setups(sdpa_model, tm_model, args.budget, args.interval, args.evictors)

    results, agreement, machine = [], {}, {}
    with torch.inference_mode():
        for context in contexts:
            log(f"context {context}:")
            machine[context] = run_context(setups, context, args, sdpa_model.config.vocab_size)
            base = setups[0]
            base_ms = statistics.median(base.times)
            base_kv = base.kv()[0]
            for s in setups:
                kv, alloc, held = s.kv()
                ms = statistics.median(s.times)
                results.append(
                    {
                        "context": context,
                        "cache": s.name,
                        "ms": 1e3 * ms,
                        "mean_ms": 1e3 * statistics.fmean(s.times),
                        "min_ms": 1e3 * min(s.times),
                        "time_ratio": ms / base_ms,
                        "kv": kv,
                        "kv_ratio": kv / base_kv,
                        "alloc": alloc,
                        "held": held,
                    }
                )
            full = setups[1]
            agreement[context] = (
                sum(a == b for a, b in zip(base.tokens, full.tokens)),
                min(len(base.tokens), len(full.tokens)),
            )
            for s in setups:
                s.release()
            gc.collect()

    report = header(args, contexts, revision, backend) + table(results) + targets(results, contexts, args, agreement, machine)
    text = "\n".join(report) + "\n"
    print(text, end="", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
