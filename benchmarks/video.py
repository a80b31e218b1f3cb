"""Video QA under a bounded memory: memory and time per answer, plus the memory arithmetic of the 7B model.

Model: a tiny random LLaVA-NeXT-Video built offline (``tests/video_fixtures.py``; CLIP vision tower of
32 px frames, patch 2, and a Llama text model with 4 layers, hidden 256, 8 heads / 2 KV heads: 64 tokens per
frame), on a synthetic moving-shapes video written with PyAV. For 8 / 32 / 64 frames, ``full`` and
``sink`` / ``h2o`` / ``namm`` at a 25% budget (NAMM: the initial scorer, capped by the budget). Evicting
configurations prefill in chunks of ``--chunk`` tokens (``VideoQA(prefill_chunk=...)``) so that the memory
is bounded during the prompt too; ``full`` prefills in one call. Each configuration runs in its own
subprocess so that its peak RSS is its own.

Reported: tokens seen, held per layer, KV bytes held at the end (``stats()["kv_bytes"]``), the peak KV held at
any point (largest held count per layer after an append, summed over layers), peak RSS, and the median wall
time of ``--repeats`` answers (``--new-tokens`` greedy tokens each, after one warm-up).

The dry run uses the numbers of ``LlavaNextVideoConfig()``'s defaults (the 7B model: CLIP ViT-L/14 at 336 px,
Llama text model with 32 layers, 32 KV heads of dim 128) in float16; nothing is loaded.

    python benchmarks/video.py [--frames 8 32 64] [--repeats 3] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> dict:
    import torch

    from tokenmem.adapters import VideoQA, read_video

    torch.set_num_threads(max(1, os.cpu_count() // 2))
    evictor = args.child
    options = dict(frames=args.n_frames)
    if evictor != "full":
        options.update(budget=args.budget, prefill_chunk=args.chunk, interval=args.interval)
    qa = VideoQA(args.model, evictor, **options)
    clip = read_video(args.video, args.n_frames)
    peak = {}

    def ask():
        memory = qa.memory()
        original = memory.update

        def spy(key_states, value_states, layer_idx, *a, **k):
            out = original(key_states, value_states, layer_idx, *a, **k)
            peak[layer_idx] = max(peak.get(layer_idx, 0), memory.layers[layer_idx].held)
            return out

        memory.update = spy
        return qa.ask_many([clip], [args.question], max_new_tokens=args.new_tokens, memory=memory)[0]

    ask()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        answer = ask()
        times.append(time.perf_counter() - start)
    stats = answer.memory.stats()
    per_token_layer = stats["kv_bytes"] / sum(stats["held"])
    return {
        "evictor": evictor, "frames": args.n_frames, "seen": stats["seen"], "held": stats["held"][0],
        "kv_bytes": stats["kv_bytes"], "peak_kv_bytes": int(sum(peak.values()) * per_token_layer),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": statistics.median(times), "tokens_per_frame": answer.report.tokens_per_frame,
    }


def dry_run_7b(chunk: int, text_tokens: int = 64, gib: int = 24) -> list[str]:
    """Frames whose KV fits in ``gib`` GiB for the 7B model, from its config numbers."""
    from transformers import LlavaNextVideoConfig

    cfg = LlavaNextVideoConfig()
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # K and V, float16
    side = vision.image_size // vision.patch_size
    per_frame = side * side // 4
    capacity = gib * 2**30 // per_token  # tokens of KV that fit
    full = (capacity - text_tokens) // per_frame
    # 25% budget with chunked prefill: the memory holds at most ceil(0.25 * seen) + chunk tokens
    quarter = (4 * (capacity - chunk) - text_tokens) // per_frame
    return [
        f"## Dry run: LLaVA-NeXT-Video-7B KV memory ({gib} GiB of KV, float16, {text_tokens} text tokens)", "",
        f"- tokens per frame: ({vision.image_size}/{vision.patch_size})^2 / 4 = {per_frame}",
        f"- KV bytes per token: 2 (K, V) x {text.num_hidden_layers} layers x {text.num_key_value_heads} KV heads x "
        f"{head_dim} dims x 2 bytes = {per_token:,} ({per_token / 2**20:.2f} MiB); per frame {per_frame * per_token / 2**20:.0f} MiB",
        f"- {gib} GiB holds {capacity:,} tokens of KV",
        f"- frames that fit, full cache: {full:,} (32 frames need {(32 * per_frame + text_tokens) * per_token / 2**30:.2f} GiB)",
        f"- frames that fit, 25% budget with prefill in chunks of {chunk}: {quarter:,} (peak KV = 25% of the tokens "
        f"seen + one chunk); an int budget bounds KV whatever the number of frames",
        "- without chunked prefill the whole prompt is in memory before the first eviction: the full-cache limit applies",
        "- the model's position range and the vision tower's activations are separate limits, not counted here",
    ]


def main() -> None:
    from tokenmem.evictor_list import add_evictors_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk of the evicting configurations")
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--question", default="What moves, and in which direction?")
    parser.add_argument("--out", default=None)
    add_evictors_argument(parser)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--video", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-frames", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    import torch
    import transformers

    from tokenmem.adapters.video_io import write_video

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny model and video fixtures
    from video_fixtures import build_tiny_llava_next_video, moving_shapes

    work = tempfile.mkdtemp(prefix="tokenmem-video-bench-")
    model = build_tiny_llava_next_video(os.path.join(work, "model"), frame_size=32, hidden=256, layers=4, heads=8,
                                        kv_heads=2, vision_layers=2)
    video = write_video(os.path.join(work, "shapes.mp4"), moving_shapes(max(args.frames) * 2, 96, 128), fps=16)
    rows = []
    for frames in args.frames:
        for evictor in (args.evictors if "full" in args.evictors else ["full", *args.evictors]):  # full: the reference
            cmd = [sys.executable, __file__, "--child", evictor, "--model", model, "--video", video, "--n-frames",
                   str(frames), "--budget", str(args.budget), "--chunk", str(args.chunk), "--interval",
                   str(args.interval), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                   "--question", args.question]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{evictor} at {frames} frames failed")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {frames} frames {evictor}: {row['seconds']:.2f} s/answer", file=sys.stderr)
    mib = lambda b: b / 2**20  # noqa: E731
    lines = [
        "# Video QA benchmark", "",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPU cores "
        f"(load average {os.getloadavg()[0]:.1f} at the end)",
        f"- tiny LLaVA-NeXT-Video (random weights): text Llama 4 layers, hidden 256, 8 heads / 2 KV heads; "
        f"{rows[0]['tokens_per_frame']} tokens per frame; {args.new_tokens} new tokens per answer, median of "
        f"{args.repeats}; evictors at budget {args.budget:g}, prefill chunk {args.chunk}, interval {args.interval}", "",
        "| frames | evictor | seen | held/layer | KV held (MiB) | KV vs full | peak KV (MiB) | peak RSS (MiB) | s/answer |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        full = next(f for f in rows if f["frames"] == r["frames"] and f["evictor"] == "full")
        lines.append(f"| {r['frames']} | {r['evictor']} | {r['seen']} | {r['held']} | {mib(r['kv_bytes']):.2f} | "
                     f"{r['kv_bytes'] / full['kv_bytes']:.1%} | {mib(r['peak_kv_bytes']):.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['seconds']:.2f} |")
    lines += [""] + dry_run_7b(args.chunk)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
