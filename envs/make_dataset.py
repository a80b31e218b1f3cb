"""Make D4RL-style "medium" and "expert" offline datasets in Minari's format from real MuJoCo physics.

D4RL (Fu et al., 2020, arXiv:2004.07219) made its MuJoCo datasets by training Soft Actor-Critic online,
then recording a partially trained policy ("medium", about a third of the expert's return) and the fully
trained one ("expert"). This script does the same with Stable-Baselines3's SAC (Raffin et al., JMLR
2021; Haarnoja et al., "Soft Actor-Critic", ICML 2018, arXiv:1801.01290) and writes the datasets with
Minari's ``create_dataset_from_buffers`` (see :mod:`tokenmem.envs.datasets`).

    # 1. train the behaviour policy (checkpoints every --checkpoint-every steps; --resume after a kill)
    python -m tokenmem.envs.make_dataset train --env Hopper-v5 --steps 1000000 --out runs/hopper-sac --seed 0
    # 2. record the datasets from its snapshots (one per --eval-every steps, each with its evaluated return)
    python -m tokenmem.envs.make_dataset record --run runs/hopper-sac --kind medium --steps 200000 --root runs/datasets
    python -m tokenmem.envs.make_dataset record --run runs/hopper-sac --kind expert --steps 200000 --root runs/datasets
    # or both steps: python -m tokenmem.envs.make_dataset all --env Hopper-v5 --out runs/hopper-sac --root runs/datasets

Everything is seeded (SAC's seed, evaluation episode seeds, recording seeds) and logged in
``OUT/train.json``, ``OUT/evals.jsonl`` and ``<root>/<dataset id>.record.json``. Needs
``pip install tokenmem[train]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tokenmem.errors import TokenmemError

from .datasets import Episode, write_dataset
from .mujoco_tasks import get_task, make_env, normalised_score

EVAL_SEED_BASE = 10_000  # evaluation episodes use seeds 10000, 10001, ...
MEDIUM_FRACTION = 1 / 3  # D4RL's medium policies reach about a third of the expert's return


def _sb3():
    try:
        import stable_baselines3
    except ImportError as exc:
        raise TokenmemError("dataset creation trains SAC with stable-baselines3: `pip install tokenmem[train]`") from exc
    return stable_baselines3


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# -- policies ----------------------------------------------------------------------------------------
def run_policy(policy, env_id: str, seeds, *, deterministic: bool) -> list[Episode]:
    """One recorded episode per seed with an SB3 policy (``policy.predict``, actions within the bounds)."""
    env = make_env(env_id)
    episodes = []
    for seed in seeds:
        obs, _ = env.reset(seed=int(seed))
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        while True:
            action, _ = policy.predict(obs, deterministic=deterministic)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(np.asarray(action, dtype=np.float32))
            rewards.append(float(reward))
            terms.append(bool(terminated))
            truncs.append(bool(truncated))
            if terminated or truncated:
                break
        episodes.append(Episode(np.stack(observations), np.stack(actions), np.asarray(rewards),
                                np.asarray(terms), np.asarray(truncs), seed=int(seed)))
    env.close()
    return episodes


# -- training ----------------------------------------------------------------------------------------
def _latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if (path / "model.zip").exists() else None


def _checkpointer(args, out: Path, log: dict, log_path: Path, start: int):
    """The SAC callback that evaluates (and snapshots the policy) every ``eval_every`` steps and checkpoints the
    model and replay buffer every ``checkpoint_every`` steps (``latest`` moves once the files are complete)."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Checkpointer(BaseCallback):
        def __init__(self):
            super().__init__()
            self.t0 = time.perf_counter()
            self.start = start
            self.bar = None

        def _on_training_start(self):
            from tqdm import tqdm

            self.bar = tqdm(total=args.steps, initial=self.start, desc=f"SAC {args.env}", disable=args.no_progress,
                            mininterval=5)

        def _on_step(self) -> bool:
            n = self.model.num_timesteps
            self.bar.update(1)
            if n % args.eval_every == 0 or n == args.steps:
                self._evaluate(n)
            if n % args.checkpoint_every == 0 or n == args.steps:
                self._checkpoint(n)
            return True

        def _evaluate(self, n):
            seeds = [EVAL_SEED_BASE + i for i in range(args.eval_episodes)]
            returns = [ep.ret for ep in run_policy(self.model.policy, args.env, seeds, deterministic=True)]
            snap = out / "snapshots" / f"step_{n:08d}.pt"
            self.model.policy.save(str(snap))
            row = {"step": n, "snapshot": snap.name, "eval_seeds": seeds, "returns": returns,
                   "mean_return": float(np.mean(returns)), "score": float(np.mean(normalised_score(args.env, returns)))}
            with open(out / "evals.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.set_postfix(ret=f"{row['mean_return']:.0f}", score=f"{row['score']:.1f}")

        def _checkpoint(self, n):
            name = f"step_{n:08d}"
            path = out / "checkpoints" / name
            path.mkdir(exist_ok=True)
            self.model.save(path / "model.zip")
            self.model.save_replay_buffer(path / "replay.pkl")
            elapsed = time.perf_counter() - self.t0
            log["segments"] = [s for s in log["segments"] if s["end"] <= self.start] + [
                {"start": self.start, "end": n, "seconds": elapsed, "steps_per_second": (n - self.start) / elapsed}]
            _write_json(log_path, log)
            tmp = out / "checkpoints" / "latest.tmp"
            tmp.write_text(name)
            os.replace(tmp, out / "checkpoints" / "latest")  # the pointer moves only once the files are complete
            for old in (out / "checkpoints").iterdir():
                if old.is_dir() and old.name != name:
                    shutil.rmtree(old)

        def _on_training_end(self):
            self.bar.close()

    return Checkpointer()


def train(args) -> Path:
    """Train SAC on ``args.env`` for ``args.steps`` steps into ``args.out`` (resumable)."""
    _sb3()
    from stable_baselines3 import SAC

    task = get_task(args.env)
    out = Path(args.out)
    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    log_path = out / "train.json"
    env = make_env(args.env)
    ckpt = _latest_checkpoint(out) if args.resume else None
    if ckpt is None and (out / "checkpoints" / "latest").exists() and not args.resume:
        raise TokenmemError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    learning_starts = min(args.learning_starts, max(1, args.steps // 10))
    if ckpt is not None:
        model = SAC.load(ckpt / "model.zip", env=env, device="cpu")
        model.load_replay_buffer(ckpt / "replay.pkl")
        model.set_random_seed(args.seed + model.num_timesteps)  # fresh noise after the restart, still seeded
        log = json.loads(log_path.read_text())
        print(f"resuming from {ckpt} at step {model.num_timesteps}", flush=True)
    else:
        model = SAC("MlpPolicy", env, seed=args.seed, device="cpu", learning_starts=learning_starts,
                    buffer_size=min(1_000_000, args.steps), verbose=0)
        log = {"env": args.env, "seed": args.seed, "steps": args.steps, "learning_starts": learning_starts,
               "algorithm": "stable-baselines3 SAC (MlpPolicy, default hyperparameters)", "segments": []}
    remaining = args.steps - model.num_timesteps
    if remaining <= 0:
        print(f"{out}: already trained for {model.num_timesteps} steps", flush=True)
        return out

    _write_json(log_path, log)
    model.learn(total_timesteps=remaining, reset_num_timesteps=False,
                callback=_checkpointer(args, out, log, log_path, model.num_timesteps))
    env.close()
    return out


# -- recording ---------------------------------------------------------------------------------------
def evals_of(run: Path) -> list[dict]:
    path = Path(run) / "evals.jsonl"
    if not path.exists():
        raise TokenmemError(f"{run} has no evals.jsonl; train a behaviour policy there first "
                            "(`python -m tokenmem.envs.make_dataset train --out {run}`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def choose_snapshot(run: Path, kind: str, medium_fraction: float = MEDIUM_FRACTION) -> dict:
    """The evaluation row of the snapshot to record: ``expert`` = best evaluated return; ``medium`` = the
    snapshot whose return is closest to ``medium_fraction`` x the expert's (D4RL's partially trained policy)."""
    rows = evals_of(run)
    best = max(rows, key=lambda r: r["mean_return"])
    if kind == "expert":
        return best
    if kind == "medium":
        target = medium_fraction * best["mean_return"]
        return min(rows, key=lambda r: (abs(r["mean_return"] - target), r["step"]))
    raise TokenmemError(f"unknown dataset kind {kind!r}; use 'medium' or 'expert'")


def record(args) -> dict:
    """Record ``args.steps`` transitions (whole episodes) from a snapshot into a Minari dataset."""
    _sb3()
    from stable_baselines3.sac.policies import SACPolicy

    run = Path(args.run)
    train_log = json.loads((run / "train.json").read_text())
    env_id = train_log["env"]
    task = get_task(env_id)
    row = choose_snapshot(run, args.kind, args.medium_fraction) if args.snapshot is None else \
        next((r for r in evals_of(run) if r["snapshot"] == args.snapshot), None)
    if row is None:
        raise TokenmemError(f"snapshot {args.snapshot!r} is not in {run}/evals.jsonl")
    import torch

    torch.manual_seed(args.seed)  # SAC's stochastic actions
    policy = SACPolicy.load(str(run / "snapshots" / row["snapshot"]), device="cpu")
    dataset_id = args.dataset_id or f"tokenmem/{task.name}/{args.kind}-v0"
    episodes, total, t0 = [], 0, time.perf_counter()
    seed = args.seed * 1_000_000
    while total < args.steps:
        ep = run_policy(policy, env_id, [seed + len(episodes)], deterministic=args.deterministic)[0]
        episodes.append(ep)
        total += len(ep)
    seconds = time.perf_counter() - t0
    returns = [ep.ret for ep in episodes]
    description = (f"{args.kind} dataset for {env_id}: SB3 SAC snapshot at step {row['step']} (evaluated return "
                   f"{row['mean_return']:.1f}), {'deterministic' if args.deterministic else 'stochastic'} actions, "
                   f"episode seeds {seed}..{seed + len(episodes) - 1}, made by tokenmem.envs.make_dataset")
    write_dataset(dataset_id, episodes, env_id, root=args.root, algorithm=f"SB3-SAC step {row['step']}",
                  description=description)
    summary = {
        "dataset_id": dataset_id, "env": env_id, "kind": args.kind, "snapshot": row["snapshot"],
        "snapshot_step": row["step"], "snapshot_eval_return": row["mean_return"], "seed": args.seed,
        "episode_seeds": [seed, seed + len(episodes) - 1], "deterministic": args.deterministic,
        "episodes": len(episodes), "steps": total, "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)), "score": float(np.mean(normalised_score(env_id, returns))),
        "returns": returns, "seconds": seconds, "steps_per_second": total / seconds,
    }
    root = Path(args.root) if args.root else Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari/datasets"))
    _write_json(root / f"{dataset_id.replace('/', '__')}.record.json", summary)
    print(f"{dataset_id}: {len(episodes)} episodes, {total} steps, return {summary['mean_return']:.1f} "
          f"± {summary['std_return']:.1f} (normalised {summary['score']:.1f}) from {row['snapshot']}", flush=True)
    return summary


# -- shipping ----------------------------------------------------------------------------------------
def ship(args) -> Path:
    """Copy what recreates the datasets into ``args.dest``: the run's logs (``train.json``, ``evals.jsonl``),
    the snapshots the datasets were recorded from and their ``*.record.json`` summaries (the HDF5 files
    stay out: ``record --run DEST --snapshot S --kind K`` rewrites them, deterministically on one machine)."""
    run, dest, root = Path(args.run), Path(args.dest), Path(args.root)
    records = sorted(root.glob("*.record.json"))
    if not records:
        raise TokenmemError(f"no *.record.json in {root}; record the datasets first")
    (dest / "snapshots").mkdir(parents=True, exist_ok=True)
    for name in ("train.json", "evals.jsonl"):
        shutil.copy2(run / name, dest / name)
    for record_file in records:
        summary = json.loads(record_file.read_text())
        shutil.copy2(run / "snapshots" / summary["snapshot"], dest / "snapshots" / summary["snapshot"])
        shutil.copy2(record_file, dest / record_file.name)
        print(f"shipped {summary['dataset_id']}: snapshot {summary['snapshot']}", flush=True)
    return dest


# -- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenmem.envs.make_dataset", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def train_args(q):
        q.add_argument("--env", default="Hopper-v5")
        q.add_argument("--steps", type=int, default=1_000_000, help="SAC environment steps")
        q.add_argument("--out", required=True, help="run directory (checkpoints, snapshots, logs)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--learning-starts", type=int, default=10_000)
        q.add_argument("--eval-every", type=int, default=25_000, help="steps between evaluations (each saves a snapshot)")
        q.add_argument("--eval-episodes", type=int, default=5)
        q.add_argument("--checkpoint-every", type=int, default=25_000)
        q.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
        q.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
        q.add_argument("--no-progress", action="store_true")

    def record_args(q, with_kind=True):
        steps = ["--steps", "--record-steps"] if with_kind else ["--record-steps"]
        if with_kind:
            q.add_argument("--kind", choices=["medium", "expert"], required=True)
            q.add_argument("--snapshot", default=None, help="record this snapshot file name instead of choosing")
            q.add_argument("--dataset-id", default=None, help="default tokenmem/<task>/<kind>-v0")
        q.add_argument(*steps, dest="record_steps", type=int, default=200_000, help="transitions per dataset "
                       "(whole episodes: the last one completes)")
        q.add_argument("--record-seed", type=int, default=1, help="seed of the recorded episodes and actions")
        q.add_argument("--root", default=None, help="Minari root (default $MINARI_DATASETS_PATH)")
        q.add_argument("--medium-fraction", type=float, default=MEDIUM_FRACTION)
        q.add_argument("--deterministic", action="store_true", help="record the policy's mean actions")

    train_args(sub.add_parser("train", help="train the SAC behaviour policy"))
    q = sub.add_parser("record", help="record a dataset from a trained run")
    q.add_argument("--run", required=True)
    record_args(q)
    q.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("ship", help="copy the logs, the recorded snapshots and the record summaries of a run")
    q.add_argument("--run", required=True)
    q.add_argument("--root", required=True, help="the Minari root the datasets were recorded into")
    q.add_argument("--dest", required=True, help="e.g. envs/behaviour/hopper-sac")
    q.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("all", help="train, then record medium and expert datasets")
    train_args(q)
    record_args(q, with_kind=False)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        if args.command in ("train", "all"):
            train(args)
        if args.command == "ship":
            ship(args)
        if args.command == "record":
            args.steps, args.seed = args.record_steps, args.record_seed
            record(args)
        if args.command == "all":
            args.run = args.out
            args.steps, args.seed = args.record_steps, args.record_seed
            for kind in ("medium", "expert"):
                args.kind, args.snapshot, args.dataset_id = kind, None, None
                record(args)
    except TokenmemError as exc:
        print(f"tokenmem: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
