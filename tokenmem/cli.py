"""The ``tokenmem`` command.

    tokenmem evictors                      list registered evictors
    tokenmem generate --model PATH --prompt-file F --evictor sink --budget 512
    tokenmem demo [--quick]                the three shipped models (language, video, RL) under the evictors
    tokenmem evolve --task synthetic --generations 20 --out DIR   evolve a NAMM scorer (CMA-ES)
    tokenmem rollout --env Hopper-v5 --evictor namm --budget 60   Decision Transformer episodes
    tokenmem video-qa --model PATH --video FILE --question "..." --frames 32   LLaVA-NeXT-Video QA
    tokenmem bench [--quick]               zero-shot transfer: every evictor on language, video and RL
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import TokenmemError


def _budget(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budget must be an int or a float in (0, 1], got {text!r}") from None


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--evictor", default="full", help="registered evictor name (see `tokenmem evictors`)")
    p.add_argument("--budget", type=_budget, default=None,
                   help="tokens kept per layer and KV head (int) or fraction of tokens seen (float in (0, 1])")
    p.add_argument("--interval", type=int, default=None,
                   help="new tokens between evictions (default: the evictor's, 64; NAMM 512)")
    p.add_argument("--positions", choices=["original", "shift"], default="original")


def cmd_evictors(args) -> int:
    from .evictor import list_evictors

    entries = list_evictors()
    width = max(len(n) for n in entries)
    for name, description in entries.items():
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from tokenmem.adapters.text import TextAdapter

    if args.prompt_file == "-":
        prompt = sys.stdin.read()
    else:
        if not os.path.isfile(args.prompt_file):
            raise TokenmemError(f"prompt file {args.prompt_file!r} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    if not prompt.strip():
        raise TokenmemError(f"prompt file {args.prompt_file!r} is empty; give a prompt to continue")
    torch.manual_seed(args.seed)
    adapter = TextAdapter.from_pretrained(args.model)
    result = adapter.generate(
        prompt, evictor=args.evictor, budget=args.budget, interval=args.interval, positions=args.positions,
        max_new_tokens=args.max_new_tokens, prefill_chunk=args.prefill_chunk,
    )
    print(result.texts[0])
    print("-" * 60)
    print(result.memory.summary())
    return 0


def cmd_demo(args) -> int:
    from tokenmem.zoo import demo

    return demo.run(model_path=args.model, budget=args.budget, quick=args.quick, threads=args.threads)


def cmd_bench(args) -> int:
    from tokenmem.zoo import transfer

    return transfer.main_from_args(args, "tokenmem " + " ".join(args.argv))


def cmd_evolve(args) -> int:
    import tokenmem.zoo.lm_tasks  # noqa: F401  (registers the shipped language tasks)
    from tokenmem.plugins.namm import evolve

    return evolve.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmem", description="A bounded, learned working memory for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evictors", help="list registered evictors with one-line descriptions")
    p.set_defaults(func=cmd_evictors)

    p = sub.add_parser("generate", help="generate text from a local causal LM under a bounded memory")
    p.add_argument("--model", required=True, help="local model directory (from_pretrained)")
    p.add_argument("--prompt-file", required=True, help="text file with the prompt ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="feed the prompt in chunks of this many tokens, evicting after each (bounded memory)")
    p.add_argument("--seed", type=int, default=0)
    _add_memory_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the shipped language, video and RL models under the evictors and the "
                                    "language-trained NAMM scorer")
    p.add_argument("--model", default=None, help="local model directory (default: the shipped stdlib-llama)")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of the context each memory keeps")
    p.add_argument("--quick", action="store_true",
                   help="the three parts smaller (3 language memories, 2 video memories, 100 Hopper steps): "
                        "checks an installation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these models are small, and a second OpenMP thread stalls "
                        "whenever another process takes its core)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="zero-shot transfer: every evictor on the shipped language, video and RL models")
    from tokenmem.zoo.transfer import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("evolve", help="evolve a NAMM scorer with CMA-ES (also under torchrun --nproc_per_node N)")
    p.add_argument("--task", action="append", default=None,
                   help="evolution task, repeatable (built in: synthetic; default synthetic)")
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--population", type=int, default=32)
    p.add_argument("--sigma", type=float, default=0.065, help="initial CMA-ES step size")
    p.add_argument("--elite-ratio", type=float, default=0.5, help="fraction of the population recombined into the mean")
    p.add_argument("--seed", type=int, default=0, help="CMA-ES sampling seed")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the tasks' models and prompts")
    p.add_argument("--full-covariance", action="store_true",
                   help="full-covariance CMA-ES instead of the diagonal one (sep-CMA-ES); slow for the scorer's "
                        "4,172+ dimensions")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default 1)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop early when the mean's fitness has not improved for this many generations")
    p.add_argument("--out", required=True, help="output directory: checkpoint.pkl, evolution.json, the final scorer")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pkl when it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evolve)

    from tokenmem.envs.rollout_cli import add_parser as add_rollout_parser  # Decision Transformer rollouts

    add_rollout_parser(sub, _budget)

    from tokenmem.adapters.video_cli import add_parser as add_video_qa_parser  # LLaVA-NeXT-Video QA

    add_video_qa_parser(sub, _budget, _add_memory_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given (reports name it)
    try:
        return args.func(args)
    except TokenmemError as exc:
        print(f"tokenmem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
