"""NAMM overhead: the update's share of decode time, and peak memory next to the sink evictor.

Model: a tiny-but-real Llama from config (8 layers, hidden 512, 8 heads / 2 KV heads, random weights,
seed 0, fp32). Each configuration runs in its own subprocess (so peak RSS is its own):

- prefill ``--context`` random tokens in chunks of the NAMM interval (512 by default), as a deployed
  memory would, then decode ``--decode`` tokens greedily in a hand-written loop;
- ``namm``: the initial scorer (every token scores positive, so nothing is evicted and every update
  scores the full context: the worst case for the update cost) with the paper's settings;
- ``sink``: StreamingLLM with a budget equal to the context (nothing evicted either: equal KV).

Reported: decode ms/token, the time spent inside NAMM updates during decode (features + scorer +
eviction, timed around ``evict_layer``) as a share of decode time, the memory's allocated bytes
(``stats()["bytes"]``, which includes NAMM's attention-row window and per-token state) and peak RSS.

    python benchmarks/namm.py [--context 8192] [--decode 512] [--quick] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def child(kind: str, context: int, decode: int, interval: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tokenmem
    from tokenmem.plugins.namm import NAMM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=context + decode + 16)
    model = LlamaForCausalLM(cfg).eval()
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if kind == "namm":
        memory = tokenmem.TokenMemory(model, NAMM(interval=interval))
    else:
        memory = tokenmem.TokenMemory(model, "sink", budget=context + decode + 1, interval=interval)
    spent = {"t": 0.0, "calls": 0}
    original = memory.evict_layer

    def timed(layer, keep):
        start = time.perf_counter()
        original(layer, keep)
        spent["t"] += time.perf_counter() - start
        spent["calls"] += 1

    memory.evict_layer = timed
    ids = torch.randint(0, 8192, (1, context), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        t0 = time.perf_counter()
        for s in range(0, context, interval):
            out = model(ids[:, s : s + interval], **tokenmem.cache_kwargs(model, memory), use_cache=True)
        prefill = time.perf_counter() - t0
        spent.update(t=0.0, calls=0)
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(decode):
            out = model(nxt, **tokenmem.cache_kwargs(model, memory), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - t0
    stats = memory.stats()
    return {
        "kind": kind, "context": context, "decode": decode, "prefill_s": prefill,
        "ms_per_token": 1000 * elapsed / decode, "update_s": spent["t"], "update_calls": spent["calls"],
        "update_share": spent["t"] / elapsed, "held": stats["held"][0], "bytes_mib": stats["bytes"] / 2**20,
        "kv_mib": stats["kv_bytes"] / 2**20, "rss_model_mib": rss_model,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--decode", type=int, default=512)
    parser.add_argument("--interval", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="context 2048, 128 decode steps, interval 64")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.context, args.decode, args.interval = 2048, 128, 64
    if args.child:
        print(json.dumps(child(args.child, args.context, args.decode, args.interval)))
        return
    import torch
    import transformers

    rows = []
    for kind in ("sink", "namm"):
        cmd = [sys.executable, __file__, "--child", kind, "--context", str(args.context), "--decode", str(args.decode),
               "--interval", str(args.interval)]
        load = os.getloadavg()[0]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{kind} run failed")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["load"] = f"{load:.1f}/{os.getloadavg()[0]:.1f}"
        rows.append(row)
        print(f"  {kind}: {row['ms_per_token']:.1f} ms/token, update share {100 * row['update_share']:.1f}%", file=sys.stderr)
    sink, namm = rows
    lines = [
        "# NAMM overhead benchmark", "",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPU cores",
        f"- Llama 8 layers, hidden 512, 8 heads / 2 KV heads (random weights); context {args.context}, "
        f"prefill in chunks of {args.interval}, {args.decode} greedy decode steps; NAMM interval {args.interval} "
        "(initial scorer: keeps everything, so every update scores the whole context)", "",
        "| evictor | held/layer | decode ms/token | update time in decode (s) | updates (layer calls) | update share of decode | memory allocated MiB | KV MiB | peak RSS MiB | load before/after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['held']} | {r['ms_per_token']:.1f} | {r['update_s']:.2f} | {r['update_calls']} | "
                     f"{100 * r['update_share']:.1f}% | {r['bytes_mib']:.1f} | {r['kv_mib']:.1f} | {r['peak_rss_mib']:.0f} | {r['load']} |")
    lines += ["",
              f"- NAMM update share of decode time: {100 * namm['update_share']:.1f}% (target <= 10%: "
              f"{'MET' if namm['update_share'] <= 0.10 else 'MISSED'})",
              f"- memory allocated, NAMM vs sink: {namm['bytes_mib'] / sink['bytes_mib']:.2f}x; "
              f"peak RSS NAMM vs sink: {namm['peak_rss_mib'] / sink['peak_rss_mib']:.2f}x"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
