"""``tokenmem rollout``: Decision Transformer episodes under a bounded memory, with a table of returns.

    tokenmem rollout --env Hopper-v5 --model PATH --evictor namm --budget 60 --episodes 10 --seed 0
    tokenmem rollout --evictor reference            # the official example's loop (last K steps re-encoded)
    tokenmem rollout --evictor recent --budget 60 --video hopper.mp4

Episode ``i`` uses seed ``seed + i``; ``--batch`` episodes run together as one batch through the memory.
"""

from __future__ import annotations

import os

import numpy as np

from tokenmem.errors import TokenmemError


def add_parser(sub, budget_type) -> None:
    p = sub.add_parser("rollout", help="roll out a Decision Transformer in a MuJoCo task under a bounded memory")
    p.add_argument("--env", default="Hopper-v5", help="Hopper-v5, Walker2d-v5 or HalfCheetah-v5")
    p.add_argument("--model", default=None, help="local DecisionTransformerModel directory (default: the shipped DT)")
    p.add_argument("--evictor", default="full",
                   help="registered evictor name, or 'reference' for the official re-encoding loop (last K steps)")
    p.add_argument("--budget", type=budget_type, default=None, help="tokens kept per layer and head (3 per timestep)")
    p.add_argument("--interval", type=int, default=None,
                   help="new tokens between evictions (default: 9 when --decode-span is above 1, as by default; "
                        "with --decode-span 1 the evictor's, though every step then evicts anyway)")
    p.add_argument("--evict-timesteps", action="store_true", help="evict whole timesteps (return, state, action)")
    p.add_argument("--decode-span", type=int, default=None,
                   help="calls of at most this many tokens count as decode steps (default 3: every rollout step, so "
                        "the memory evicts once --interval tokens have accumulated and holds up to budget + interval "
                        "- 1; 1: evict after every step, never above the budget)")
    p.add_argument("--namm-scorer", default=None, help="with --evictor namm: a scorer directory, a shipped name or "
                   "'initial' (default: the shipped language-trained scorer, 'language')")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="episodes rolled out together (vectorised)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="steps per episode (default: the env's limit, 1000)")
    p.add_argument("--target-return", type=float, default=None, help="conditioning return (default: the model's)")
    p.add_argument("--video", default=None, help="render the first episode offscreen to this .mp4")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _policy(adapter, args):
    from .rollout import make_policy

    options = {}
    evictor = args.evictor
    if args.namm_scorer and evictor != "namm":
        raise TokenmemError("--namm-scorer goes with --evictor namm")
    if evictor == "namm":  # zero-shot: the scorer evolved on language, unchanged
        from tokenmem.plugins.namm import NAMM

        evictor = NAMM.load(args.namm_scorer or "language")
    if args.evict_timesteps:
        if evictor == "reference":
            raise TokenmemError("--evict-timesteps needs a cached rollout (an evictor), not the reference loop")
        options["evict_timesteps"] = True
    if args.decode_span is not None:
        if evictor == "reference":
            raise TokenmemError("--decode-span needs a cached rollout (an evictor), not the reference loop")
        options["decode_span"] = args.decode_span
    return make_policy(adapter, evictor, args.budget, args.interval, **options)


def check_renderer(env_id: str) -> None:
    """Raise a clear error when MuJoCo cannot render offscreen here (before any episode runs)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from .mujoco_tasks import make_env

    try:
        env = make_env(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        env.render()
        env.close()
    except Exception as exc:  # the GL backends raise assorted types (FatalError, AttributeError, ImportError)
        raise TokenmemError(
            f"MuJoCo cannot render offscreen with MUJOCO_GL={os.environ['MUJOCO_GL']} ({type(exc).__name__}: {exc}); "
            "install an offscreen OpenGL (apt-get install libegl1 for egl, or libosmesa6 with MUJOCO_GL=osmesa), "
            "or run without --video"
        ) from exc
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError as exc:
        raise TokenmemError("writing .mp4 needs imageio-ffmpeg: `pip install tokenmem[rl]`") from exc


def write_video(path: str, frames, fps: int) -> None:
    import imageio

    imageio.mimwrite(path, [np.asarray(f) for f in frames], fps=fps, macro_block_size=1)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from tokenmem.adapters.decision import DecisionAdapter

    from .rollout import rollout

    from . import shipped_dt_path
    from .mujoco_tasks import get_task, make_env

    torch.set_num_threads(args.threads)
    task = get_task(args.env)
    if args.episodes < 1 or args.batch < 1:
        raise TokenmemError("--episodes and --batch must be >= 1")
    adapter = DecisionAdapter.from_pretrained(str(args.model or shipped_dt_path()))
    if args.video:  # after transformers is loaded: Triton's LLVM must load before Mesa's (else a segfault)
        check_renderer(args.env)
    if adapter.env_id is None:
        adapter.env_id = args.env
    max_steps = args.max_steps or task.max_episode_steps
    rows, memories, frames = [], [], []
    for first in range(0, args.episodes, args.batch):
        seeds = list(range(args.seed + first, args.seed + min(args.episodes, first + args.batch)))
        envs = [make_env(args.env, render_mode="rgb_array" if args.video and first == 0 and i == 0 else None)
                for i in range(len(seeds))]
        name = f"episode {first}" if len(seeds) == 1 else f"episodes {first}-{first + len(seeds) - 1}"
        with tqdm(total=max_steps, desc=name, disable=args.no_progress, leave=False) as bar:
            result = rollout(adapter, _policy(adapter, args), envs, seeds, max_steps=max_steps,
                             target_return=args.target_return, render=bool(args.video) and first == 0, progress=bar)
        for env in envs:
            env.close()
        if first == 0:
            frames = result.frames
        for i, seed in enumerate(seeds):
            rows.append((first + i, seed, float(result.returns[i]), int(result.lengths[i]), float(result.scores[i])))
        if result.memory is not None:
            memories.append(result.memory.summary())
    print(format_table(rows, args))
    if memories:
        print(memories[-1].replace("memory:", "last memory:"))
    if args.video:
        write_video(args.video, frames, fps=int(round(1 / envs[0].unwrapped.dt)))
        print(f"video of episode 0 ({len(frames)} frames) written to {args.video}")
    return 0


def format_table(rows, args) -> str:
    lines = [f"{args.env}  evictor={args.evictor}  budget={args.budget if args.budget is not None else 'all'}",
             f"{'episode':>7}  {'seed':>6}  {'return':>9}  {'length':>6}  {'normalised':>10}"]
    for ep, seed, ret, length, score in rows:
        lines.append(f"{ep:>7}  {seed:>6}  {ret:>9.1f}  {length:>6}  {score:>10.1f}")
    returns = np.array([r[2] for r in rows])
    scores = np.array([r[4] for r in rows])
    lines.append(f"{'mean':>7}  {'':>6}  {returns.mean():>9.1f}  {'':>6}  {scores.mean():>10.1f}")
    lines.append(f"{'std':>7}  {'':>6}  {returns.std():>9.1f}  {'':>6}  {scores.std():>10.1f}")
    return "\n".join(lines)
