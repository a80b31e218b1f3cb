"""Streaming soak: a million tokens through the shipped language model under a fixed budget.

Each configuration streams the same token stream (held-out standard-library files, concatenated and repeated
until ``--tokens`` tokens) through ``stdlib-llama`` in ``--chunk``-token calls with one memory, and reports:

- tokens/s over the whole stream;
- resident memory (RSS, from ``/proc/self/statm``, after ``malloc_trim``) at every 10% of the stream, and max/min
  over those points (flat: <= 1.05) -- the first point is taken after 10% of the stream, once the budget is reached;
- the tokens held per layer at the end (``stats()["held"]``) against the budget;
- that every chunk's logits were finite;
- that ``stats()["seen"]`` equals the tokens fed.

Configurations (default): ``sink`` at budget 1,024 with ``positions="original"`` (positions run far past the
model's 2,048 trained positions: the logits must stay finite, not good) and ``positions="shift"``, and the
shipped NAMM scorer at budget 1,024. Each runs in its own process (its RSS is its own).

    python benchmarks/soak.py [--tokens 1000000] [--chunk 512] [--budget 1024] [--configs sink:original,...]
                              [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CONFIGS = "sink:original,sink:shift,namm:original"


def rss_mib() -> float:
    """Resident memory after returning freed heap pages to the system (glibc ``malloc_trim``), so the points
    measure what the process keeps, not where the allocator's free lists happen to stand."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the raw RSS
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def token_stream(count: int):
    """``count`` token ids from the held-out standard-library files (repeated as needed), as a 1-D tensor."""
    import torch
    from transformers import AutoTokenizer

    from tokenmem.zoo import stdlib_lm_path
    from tokenmem.zoo.corpus import iter_files

    tok = AutoTokenizer.from_pretrained(stdlib_lm_path())
    ids: list[int] = []
    files = iter_files(split="heldout")
    for f in files:
        ids.extend(tok(f.text, add_special_tokens=False)["input_ids"])
        if len(ids) >= min(count, 400_000):
            break
    reps = -(-count // len(ids))
    return torch.tensor((ids * reps)[:count])


def child(evictor: str, positions: str, tokens: int, chunk: int, budget: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import tokenmem
    from tokenmem import TokenMemory
    from tokenmem.plugins.namm import NAMM
    from tokenmem.zoo import stdlib_lm_path

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(stdlib_lm_path()).eval()
    stream = token_stream(tokens)[None]
    memory = TokenMemory(model, NAMM.pretrained("language") if evictor == "namm" else evictor, budget=budget,
                         positions=positions)
    marks = [int(tokens * k / 10) for k in range(1, 11)]
    rss, held, finite, fed = [], [], True, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, tokens, chunk):
            logits = model(input_ids=stream[:, s : s + chunk], **tokenmem.cache_kwargs(model, memory), use_cache=True,
                           logits_to_keep=1).logits
            finite &= bool(torch.isfinite(logits).all())
            fed += min(chunk, tokens - s)
            while marks and fed >= marks[0]:
                marks.pop(0)
                rss.append(round(rss_mib(), 1))
                held.append(max(memory.stats()["held"]))
    seconds = time.perf_counter() - t0
    stats = memory.stats()
    return {"evictor": evictor, "positions": positions, "tokens": tokens, "chunk": chunk, "budget": budget,
            "threads": threads, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            "rss_mib": rss, "rss_max_over_min": round(max(rss) / min(rss), 4), "held_at_marks": held,
            "held_end": stats["held"], "finite": finite, "seen": stats["seen"], "seen_ok": stats["seen"] == fed,
            "evictions": stats["evictions"]}


def render(rows: list[dict]) -> str:
    lines = ["| evictor | positions | tokens | tokens/s | RSS MiB at 10%..100% | RSS max/min | held/layer at end "
             "(budget) | finite logits | seen == fed |", "|---|---|---:|---:|---|---:|---|---|---|"]
    for r in rows:
        held = f"{min(r['held_end'])}-{max(r['held_end'])}" if min(r["held_end"]) != max(r["held_end"]) \
            else str(r["held_end"][0])
        lines.append(f"| {r['evictor']} | {r['positions']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{' '.join(f'{x:.0f}' for x in r['rss_mib'])} | {r['rss_max_over_min']:.3f} "
                     f"({'flat' if r['rss_max_over_min'] <= 1.05 else 'NOT flat'}) | {held} ({r['budget']}) | "
                     f"{'yes' if r['finite'] else 'NO'} | {'yes' if r['seen_ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="evictor:positions pairs, comma-separated")
    p.add_argument("--out", default=str(RESULTS), help="directory for soak.json / soak.md ('' = none)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        evictor, positions = args.child.split(":")
        print(json.dumps(child(evictor, positions, args.tokens, args.chunk, args.budget, args.threads)))
        return 0
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        cmd = [sys.executable, __file__, "--child", config, "--tokens", str(args.tokens), "--chunk", str(args.chunk),
               "--budget", str(args.budget), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{config} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{config}: {rows[-1]['tokens_per_s']:.0f} tokens/s, RSS max/min {rows[-1]['rss_max_over_min']}",
              file=sys.stderr, flush=True)
    md = render(rows)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "soak.md").write_text(md)
    ok = all(r["finite"] and r["seen_ok"] and max(r["held_end"]) <= r["budget"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
