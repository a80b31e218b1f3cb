"""Streaming speed of the evictors on the shipped language model: tokens/s of a chunked prefill and of decoding.

Every configuration streams the same held-out prompts (the *eval* split of the shipped code-completion task,
``--prompts`` of them) through ``stdlib-llama`` in ``--chunk``-token chunks (the memory evicts after every
chunk when over budget), then decodes ``--decode`` tokens greedily, one token per call. The configurations run
round-robin, ``--repeat`` times each, in one process with the same thread count, and the table gives the median
over the rounds, so a slow moment of the machine hits every configuration alike. ``namm`` is the shipped
language scorer (``NAMM.pretrained("language")``, or ``--scorer``).

The ratio column is ``tokens/s of h2o / tokens/s of the row`` at the same budget: NAMM's target (issue 16) is a
prefill ratio of at most 1.3.

    python benchmarks/streaming.py [--evictors full,sink,h2o,namm] [--budgets 0.25,0.5] [--repeat 5] [--breakdown]
                                   [--prompts 6] [--chunk 128] [--decode 64] [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tokenmem.compat import cache_kwargs

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--evictors", default="full,recent,sink,h2o,namm",
                   help="comma-separated registered evictor names ('full' runs once, without a budget)")
    p.add_argument("--budgets", default="0.25,0.5")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scorer", default="language", help="NAMM scorer: a shipped name, 'initial' or a path")
    p.add_argument("--out", default=str(RESULTS), help="directory for streaming.json / streaming.md ('' = none)")
    p.add_argument("--breakdown", action="store_true",
                   help="after the rounds, stream the prompts once more with NAMM at each budget, timing its own parts "
                        "(spectrogram/EMA update, features, BAM scorer) and give their share of the prefill")
    return p.parse_args(argv)


def stream(model, memory, prompt: torch.Tensor, chunk: int, decode: int) -> tuple[float, float]:
    """Seconds of the chunked prefill and of ``decode`` greedy steps."""
    with torch.no_grad():
        t0 = time.perf_counter()
        for s in range(0, prompt.shape[1], chunk):
            logits = model(input_ids=prompt[:, s : s + chunk], **cache_kwargs(model, memory), use_cache=True,
                           logits_to_keep=1).logits[:, -1]
        t1 = time.perf_counter()
        for _ in range(decode):
            logits = model(input_ids=logits.argmax(-1, keepdim=True), **cache_kwargs(model, memory), use_cache=True,
                           logits_to_keep=1).logits[:, -1]
        return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    from tokenmem import TokenMemory, list_evictors
    from tokenmem.plugins.namm import NAMM
    from tokenmem.zoo import stdlib_lm_path
    from tokenmem.zoo.lm_tasks import load_records

    torch.set_num_threads(args.threads)
    known = list_evictors()
    names = [n for n in args.evictors.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown evictors {unknown}; registered: {', '.join(known)}")
    budgets = [float(b) for b in args.budgets.split(",") if b]
    model = AutoModelForCausalLM.from_pretrained(stdlib_lm_path()).eval()
    prompts = [torch.tensor(r["input_ids"])[None] for r in load_records("code-completion", "eval")[: args.prompts]]
    tokens = sum(p.shape[1] for p in prompts)
    scorer = NAMM.load(args.scorer) if "namm" in names else None
    configs = [(n, None) if n == "full" else (n, b) for n in names for b in ([None] if n == "full" else budgets)]

    def memory(name, budget):
        return TokenMemory(model, scorer if name == "namm" else name, budget=budget)

    stream(model, memory(*configs[0]), prompts[0], args.chunk, 2)  # warm-up (kernel build, allocator)
    times = {c: [] for c in configs}
    for r in range(args.repeat):
        for c in configs:
            pre = dec = 0.0
            for p in prompts:
                a, b = stream(model, memory(*c), p, args.chunk, args.decode)
                pre, dec = pre + a, dec + b
            times[c].append((pre, dec))
        print(f"round {r + 1}/{args.repeat} done", file=sys.stderr, flush=True)

    rows = []
    for (name, budget), runs in times.items():
        pre = statistics.median(t[0] for t in runs)
        dec = statistics.median(t[1] for t in runs)
        rows.append({"evictor": name, "budget": budget, "prefill_tokens_per_s": tokens / pre,
                     "decode_tokens_per_s": (args.decode * len(prompts) / dec) if args.decode else None,
                     "prefill_s_runs": [t[0] for t in runs], "decode_s_runs": [t[1] for t in runs]})
    by = {(r["evictor"], r["budget"]): r for r in rows}
    for r in rows:
        ref = by.get(("h2o", r["budget"]))
        r["prefill_h2o_over_row"] = ref["prefill_tokens_per_s"] / r["prefill_tokens_per_s"] if ref else None
        r["decode_h2o_over_row"] = (ref["decode_tokens_per_s"] / r["decode_tokens_per_s"]
                                    if ref and args.decode else None)
    md = render(rows, args, tokens, len(prompts))
    if args.breakdown and scorer is not None:
        md += "\n" + namm_breakdown(model, memory, prompts, budgets, args.chunk)
    elif args.breakdown:
        print("--breakdown times NAMM's parts: add namm to --evictors", file=sys.stderr)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "streaming.json").write_text(json.dumps({"settings": vars(args), "tokens": tokens,
                                                        "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
        (out / "streaming.md").write_text(md)
    return 0


def namm_breakdown(model, memory, prompts, budgets, chunk: int) -> str:
    """Prefill seconds of NAMM's own parts, timed by wrapping the functions its evictor calls (one more pass)."""
    from tokenmem.plugins.namm import evictor as namm_evictor

    parts = {"update_ema": "spectrogram + EMA update (every chunk)",
             "features": "features (recency, normalised EMA, key distinctiveness)",
             "bam_scores": "BAM scorer (backward attention, every eviction)"}
    spent = {name: 0.0 for name in parts}
    calls = {name: 0 for name in parts}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
        return wrapper

    originals = {"update_ema_aligned": namm_evictor.update_ema_aligned, "update_ema": namm_evictor.update_ema,
                 "bam_scores": namm_evictor.bam_scores, "features": namm_evictor.NAMM.features}
    lines = ["NAMM's own prefill work (one more pass over the prompts; its functions timed where the evictor "
             "calls them):", "", "| budget | prefill s | " + " | ".join(parts.values()) + " |",
             "|---|---:|" + "---:|" * len(parts)]
    try:
        namm_evictor.update_ema_aligned = timed("update_ema", originals["update_ema_aligned"])  # n_fft == 2 hop
        namm_evictor.update_ema = timed("update_ema", originals["update_ema"])  # any other STFT setting
        namm_evictor.bam_scores = timed("bam_scores", originals["bam_scores"])
        namm_evictor.NAMM.features = timed("features", originals["features"])
        for budget in budgets:
            for name in parts:
                spent[name], calls[name] = 0.0, 0
            total = max(sum(stream(model, memory("namm", budget), p, chunk, 0)[0] for p in prompts), 1e-9)
            cells = [f"{spent[n]:.2f} s ({spent[n] / total:.0%}; {1000 * spent[n] / max(calls[n], 1):.2f} ms x "
                     f"{calls[n]})" for n in parts]
            lines.append(f"| {budget:.0%} | {total:.2f} | " + " | ".join(cells) + " |")
    finally:
        namm_evictor.update_ema_aligned = originals["update_ema_aligned"]
        namm_evictor.update_ema = originals["update_ema"]
        namm_evictor.bam_scores = originals["bam_scores"]
        namm_evictor.NAMM.features = originals["features"]
    return "\n".join(lines) + "\n"


def render(rows, args, tokens, prompts) -> str:
    def f(x, fmt="{:.0f}"):
        return "–" if x is None else fmt.format(x)

    lines = [f"Streaming on stdlib-llama: {prompts} eval code-completion prompts ({tokens:,} tokens) in {args.chunk}-token "
             f"chunks, then {args.decode} greedy decode steps each; torch threads {args.threads}; median of "
             f"{args.repeat} round-robin rounds.", "",
             "| evictor | budget | prefill tokens/s | h2o / row (prefill) | decode tokens/s | h2o / row (decode) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        budget = "all" if r["budget"] is None else f"{r['budget']:.0%}"
        lines.append(f"| {r['evictor']} | {budget} | {f(r['prefill_tokens_per_s'])} | "
                     f"{f(r['prefill_h2o_over_row'], '{:.2f}')} | {f(r['decode_tokens_per_s'])} | "
                     f"{f(r['decode_h2o_over_row'], '{:.2f}')} |")
    namm = [r for r in rows if r["evictor"] == "namm" and r["prefill_h2o_over_row"] is not None]
    if namm:
        worst = max(r["prefill_h2o_over_row"] for r in namm)
        lines += ["", f"NAMM prefill within 1.3x of h2o at every budget: {'MET' if worst <= 1.3 else 'NOT MET'} "
                      f"(worst ratio {worst:.2f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
