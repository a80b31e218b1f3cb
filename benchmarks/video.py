"""Video QA under a bounded memory: memory and time per answer, plus the memory arithmetic of the 7B models.

Models (``--archs``), side by side on the same video:

- ``llava``: a tiny random LLaVA-NeXT-Video built offline (``tests/video_fixtures.py``; CLIP vision tower of 32 px
  frames, patch 2, and a Llama text model with 4 layers, hidden 256, 8 heads / 2 KV heads: 64 tokens per frame);
- ``qwen2vl``: a Qwen2-VL of the shipped model's architecture (:mod:`tokenmem.zoo.qwen2vl_model`: random vision
  tower, the shipped stdlib-llama as its 4-layer, hidden-256, 8 / 2-head language model) with frames resized to
  at least 224 x 224 px: 14 px patches over 2 frames, 2 x 2 merged, 70 tokens per temporal patch (35 per frame),
  M-RoPE positions;

on a synthetic moving-shapes video written with PyAV. For 8 / 32 / 64 frames, ``full`` and every registered
evictor (``--evictors``) at budgets of 25% and 50% of the tokens seen (``namm`` by name: its initial scorer; the
shipped language scorer's accuracy on video is ``tokenmem bench``'s, see the README). Evicting
configurations prefill in chunks of ``--chunk`` tokens (``VideoQA(prefill_chunk=...)``) so that the memory
is bounded during the prompt too; ``full`` prefills in one call. Each configuration runs in its own
subprocess so that its peak RSS is its own.

Reported: tokens seen, held per layer, KV bytes held at the end (``stats()["kv_bytes"]``), the peak KV held at
any point (largest held count per layer after an append, summed over layers), peak RSS, and the median wall
time of ``--repeats`` answers (``--new-tokens`` greedy tokens each, after one warm-up).

The dry runs use the numbers of ``LlavaNextVideoConfig()``'s defaults (the 7B model: CLIP ViT-L/14 at 336 px,
Llama text model with 32 layers, 32 KV heads of dim 128) and of Qwen2-VL-7B-Instruct's config (28 layers, 4 KV
heads of dim 128; 448 x 448 px frames give 256 tokens per temporal patch of 2 frames) in float16; nothing is
loaded.

    python benchmarks/video.py [--archs llava qwen2vl] [--frames 8 32 64] [--repeats 3] [--out table.md]
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

    from tokenmem.adapters import read_video
    from tokenmem.adapters.qwen2vl import video_qa

    torch.set_num_threads(max(1, os.cpu_count() // 2))
    evictor = args.child
    options = dict(frames=args.n_frames)
    if evictor != "full":
        options.update(budget=args.budget, prefill_chunk=args.chunk, interval=args.interval)
    qa = video_qa(args.model, evictor, **options)  # VideoQA or Qwen2VLVideoQA, by the model's type
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
        "video_tokens": answer.report.frames * answer.report.tokens_per_frame,
    }


def build_qwen2vl(path: str) -> str:
    """A Qwen2-VL of the shipped model's architecture with a random vision tower (the language model: the shipped
    stdlib-llama) saved at ``path``; its frames resized to at least 224 x 224 px."""
    import json

    from tokenmem.zoo import video_model as vm

    spec = vm.Spec(arch="qwen2vl")
    tok = vm.build_tokenizer("qwen2vl")
    vm.save_pretrained(vm.build_model(spec, tok, seed=0).eval(), tok, spec, Path(path))
    config = Path(path) / "video_preprocessor_config.json"
    data = json.loads(config.read_text())
    data["size"] = {"shortest_edge": 224 * 224, "longest_edge": 448 * 448}
    config.write_text(json.dumps(data, indent=2) + "\n")
    return path


def dry_run_qwen2vl_7b(chunk: int, text_tokens: int = 64, gib: int = 24, side: int = 448) -> list[str]:
    """Frames whose KV fits in ``gib`` GiB for Qwen2-VL-7B, from its config numbers (Qwen2-VL-7B-Instruct's
    config.json: 28 layers, hidden 3584, 28 heads / 4 KV heads; 14 px patches, 2 x 2 merge, temporal patch 2;
    ``Qwen2VLConfig()``'s defaults are the 72B model's text sizes)."""
    from types import SimpleNamespace

    text = SimpleNamespace(num_hidden_layers=28, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4)
    vision = SimpleNamespace(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # K and V, float16
    per_patch = (side // (vision.patch_size * vision.spatial_merge_size)) ** 2  # tokens per temporal patch
    per_frame = per_patch / vision.temporal_patch_size
    capacity = gib * 2**30 // per_token
    full = int((capacity - text_tokens) / per_frame)
    quarter = int((4 * (capacity - chunk) - text_tokens) / per_frame)
    return [
        f"## Dry run: Qwen2-VL-7B KV memory ({gib} GiB of KV, float16, {text_tokens} text tokens, {side} x {side} px "
        "frames)", "",
        f"- tokens per temporal patch of {vision.temporal_patch_size} frames: ({side}/{vision.patch_size})^2 / "
        f"{vision.spatial_merge_size ** 2} = {per_patch} ({per_frame:g} per frame)",
        f"- KV bytes per token: 2 (K, V) x {text.num_hidden_layers} layers x {text.num_key_value_heads} KV heads x "
        f"{head_dim} dims x 2 bytes = {per_token:,} ({per_token / 2**20:.3f} MiB); per frame "
        f"{per_frame * per_token / 2**20:.1f} MiB",
        f"- {gib} GiB holds {capacity:,} tokens of KV",
        f"- frames that fit, full cache: {full:,}",
        f"- frames that fit, 25% budget with prefill in chunks of {chunk}: {quarter:,}",
        "- grouped-query attention (4 KV heads for 28 query heads) makes a Qwen2-VL-7B token 9x cheaper to hold than "
        "a LLaVA-NeXT-Video-7B token; the budget's ratio is the same",
    ]


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
    parser.add_argument("--archs", nargs="+", default=["llava", "qwen2vl"], choices=["llava", "qwen2vl"],
                        help="video model architectures, side by side (default both)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5],
                        help="budgets of the evictors (fractions of the tokens seen; default 0.25 0.5)")
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)  # a child's one budget
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
    models = {}
    if "llava" in args.archs:
        models["llava"] = build_tiny_llava_next_video(os.path.join(work, "llava"), frame_size=32, hidden=256, layers=4,
                                                      heads=8, kv_heads=2, vision_layers=2)
    if "qwen2vl" in args.archs:
        models["qwen2vl"] = build_qwen2vl(os.path.join(work, "qwen2vl"))
    video = write_video(os.path.join(work, "shapes.mp4"), moving_shapes(max(args.frames) * 2, 96, 128), fps=16)
    rows = []
    for (arch, model), frames in ((m, f) for m in models.items() for f in args.frames):
        setups = [("full", 1.0)] + [(e, b) for e in args.evictors if e != "full" for b in args.budgets]
        for evictor, budget in setups:  # full: the reference
            cmd = [sys.executable, __file__, "--child", evictor, "--model", model, "--video", video, "--n-frames",
                   str(frames), "--budget", str(budget), "--chunk", str(args.chunk), "--interval",
                   str(args.interval), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                   "--question", args.question]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{evictor} at {frames} frames failed")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["arch"], row["budget"] = arch, None if evictor == "full" else budget
            rows.append(row)
            print(f"  {arch} {frames} frames {evictor} {budget:g}: {row['seconds']:.2f} s/answer", file=sys.stderr)
    mib = lambda b: b / 2**20  # noqa: E731
    lines = [
        "# Video QA benchmark", "",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPU cores "
        f"(load average {os.getloadavg()[0]:.1f} at the end)",
        "- llava: tiny LLaVA-NeXT-Video (random weights): text Llama 4 layers, hidden 256, 8 heads / 2 KV heads, 64 "
        "tokens per frame; qwen2vl: Qwen2-VL, random vision tower, stdlib-llama text model (4 layers, hidden 256, "
        "8 heads / 2 KV heads), 70 tokens per temporal patch of 2 frames (video tokens: the prompt's)",
        f"- {args.new_tokens} new tokens per answer, median of {args.repeats}; evictors at budgets "
        f"{', '.join(f'{b:g}' for b in args.budgets)} (fractions of the tokens seen), "
        f"prefill chunk {args.chunk}, interval {args.interval}", "",
        "| model | frames | video tokens | evictor | budget | seen | held/layer | KV held (MiB) | KV vs full | "
        "peak KV (MiB) | peak RSS (MiB) | s/answer |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        full = next(f for f in rows if f["frames"] == r["frames"] and f["arch"] == r["arch"] and f["evictor"] == "full")
        budget = "all" if r["budget"] is None else f"{r['budget']:.0%}"
        lines.append(f"| {r['arch']} | {r['frames']} | {r['video_tokens']} | {r['evictor']} | {budget} | {r['seen']} | "
                     f"{r['held']} | {mib(r['kv_bytes']):.2f} | "
                     f"{r['kv_bytes'] / full['kv_bytes']:.1%} | {mib(r['peak_kv_bytes']):.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['seconds']:.2f} |")
    lines += [""] + dry_run_7b(args.chunk) + [""] + dry_run_qwen2vl_7b(args.chunk)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
