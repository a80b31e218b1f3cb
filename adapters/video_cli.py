"""``tokenmem video-qa``: answer a question about a video, print the memory summary and the kept-token table."""

from __future__ import annotations


def add_parser(sub, budget_type, add_memory_args) -> None:
    """Register the ``video-qa`` subcommand (``budget_type`` / ``add_memory_args`` come from tokenmem.cli)."""
    p = sub.add_parser("video-qa", help="answer a question about a video with LLaVA-NeXT-Video or Qwen2-VL "
                       "(chosen by the model's type) under a bounded memory")
    p.add_argument("--model", required=True, help="local LLaVA-NeXT-Video, Qwen2-VL or Qwen2.5-VL directory "
                   "(from_pretrained)")
    p.add_argument("--video", required=True, help="video file (read with decord; PyAV as the fallback)")
    p.add_argument("--question", required=True)
    p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly (default 32)")
    p.add_argument("--fps", type=float, default=None, help="sample this many frames per second instead of --frames")
    p.add_argument("--reader", choices=["auto", "decord", "pyav"], default="auto")
    p.add_argument("--evict-unit", choices=["token", "frame"], default="token",
                   help="'frame' keeps or drops all tokens of a frame together")
    p.add_argument("--no-protect-question", action="store_true", help="let the evictor drop question tokens too")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="feed the prompt in chunks of this many tokens, evicting after each (bounded memory)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--plot", default=None, help="save a frame x layer heat map of the kept tokens (PNG)")
    p.add_argument("--seed", type=int, default=0)
    add_memory_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .qwen2vl import video_qa

    torch.manual_seed(args.seed)
    qa = video_qa(args.model, args.evictor, args.budget, interval=args.interval, positions=args.positions,
                 evict_unit=args.evict_unit, protect_question=not args.no_protect_question, frames=args.frames,
                 fps=args.fps, reader=args.reader, prefill_chunk=args.prefill_chunk)
    answer = qa.ask(args.video, args.question, max_new_tokens=args.max_new_tokens)
    clip = answer.clip
    print(answer.text)
    print("-" * 60)
    print(f"video: {clip.num_frames} of {clip.total_frames} frames ({clip.reader}), "
          f"{answer.report.tokens_per_frame} tokens per frame")
    print(answer.memory.summary())
    print(answer.report.table())
    if args.plot:
        budget = "all" if args.budget is None else args.budget
        answer.report.plot(args.plot, title=f"{args.evictor}, budget {budget}, per {args.evict_unit}: "
                                            "share of each frame's tokens kept")
        print(f"plot: {args.plot}")
    return 0
