"""Train a ``transformers.DecisionTransformerModel`` on a Minari dataset (the DT paper's gym recipe).

Chen et al., "Decision Transformer: Reinforcement Learning via Sequence Modeling" (NeurIPS 2021,
arXiv:2106.01345), gym experiments (``kzl/decision-transformer``, ``gym/experiment.py``), Hopper settings
as defaults: context K=20, embedding 128, 3 layers, 1 head, ReLU MLP of 4x128, dropout 0.1, return scale
1000, max episode length 1000, batch 64, AdamW lr 1e-4 with weight decay 1e-4 and a 10k-step linear
warm-up, gradient clipping 0.25, MSE on the predicted actions. Batches: trajectories drawn in proportion
to their length, a random start, ``K`` steps left-padded with a mask; returns-to-go undiscounted and
divided by the scale; states normalised with the dataset's mean and std (+1e-6).

    python -m tokenmem.envs.train_dt --dataset tokenmem/hopper/medium-v0 --root runs/datasets \\
        --out runs/dt-hopper --time-limit 60 --eval-episodes 10 --export tokenmem/envs/models/hopper-medium-dt

Checkpoints (model, optimizer, scheduler, both RNG states, step, the log and the losses not yet logged) go to
``OUT/checkpoint.pt`` every ``--checkpoint-every`` steps; ``--resume`` continues from it bit-for-bit on the same
machine and thread count.
The trained model is ``OUT/model`` (a ``from_pretrained`` directory whose ``config.tokenmem`` holds the env id,
state statistics, K, return scale and target return that :class:`tokenmem.adapters.decision.DecisionAdapter`
reads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokenmem.errors import TokenmemError
from tokenmem.files import load_torch, save_torch

from .datasets import Episode, episodes_of, load_dataset, state_stats
from .mujoco_tasks import get_task


def build_model(state_dim: int, act_dim: int, args):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    config = DecisionTransformerConfig(
        state_dim=state_dim, act_dim=act_dim, hidden_size=args.embed, max_ep_len=args.max_ep_len, action_tanh=True,
        n_layer=args.layers, n_head=args.heads, n_inner=4 * args.embed, activation_function="relu",
        n_positions=1024, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=None, eos_token_id=None,
    )
    return DecisionTransformerModel(config)


class TrajectorySampler:
    """Batches of ``K``-step windows, drawn as in the DT paper's gym code (see module docstring)."""

    def __init__(self, episodes: list[Episode], state_mean, state_std, *, context: int, return_scale: float,
                 max_ep_len: int):
        self.episodes = [ep for ep in episodes if len(ep) > 0]
        if not self.episodes:
            raise TokenmemError("the dataset has no non-empty episodes to train on")
        self.mean, self.std = np.asarray(state_mean), np.asarray(state_std)
        self.K, self.scale, self.max_ep_len = context, return_scale, max_ep_len
        lengths = np.array([len(ep) for ep in self.episodes], dtype=np.float64)
        self.p = lengths / lengths.sum()
        # returns-to-go of every step (undiscounted), with a trailing 0 per episode
        self.rtg = [np.concatenate([np.cumsum(ep.rewards[::-1])[::-1], [0.0]]) for ep in self.episodes]
        self.state_dim = self.episodes[0].observations.shape[1]
        self.act_dim = self.episodes[0].actions.shape[1]

    def sample(self, rng: np.random.Generator, batch: int) -> dict[str, torch.Tensor]:
        K = self.K
        S = np.zeros((batch, K, self.state_dim), np.float32)
        A = np.zeros((batch, K, self.act_dim), np.float32)
        R = np.zeros((batch, K, 1), np.float32)
        T = np.zeros((batch, K), np.int64)
        M = np.zeros((batch, K), np.int64)
        for i, j in enumerate(rng.choice(len(self.episodes), size=batch, p=self.p)):
            ep = self.episodes[j]
            start = int(rng.integers(0, len(ep)))
            end = min(start + K, len(ep))
            n = end - start
            S[i, K - n:] = (ep.observations[start:end] - self.mean) / self.std
            A[i, K - n:] = ep.actions[start:end]
            R[i, K - n:, 0] = self.rtg[j][start:end] / self.scale
            T[i, K - n:] = np.minimum(np.arange(start, end), self.max_ep_len - 1)
            M[i, K - n:] = 1
        tensors = dict(states=S, actions=A, returns_to_go=R, timesteps=T, attention_mask=M)
        return {k: torch.from_numpy(v) for k, v in tensors.items()}


def settings_of(args, env_id: str, mean, std, dataset_id: str) -> dict:
    return {"env_id": env_id, "state_mean": [float(x) for x in mean], "state_std": [float(x) for x in std],
            "context": args.context, "return_scale": args.return_scale, "target_return": args.target_return,
            "dataset": dataset_id, "seed": args.seed, "trained_by": "tokenmem.envs.train_dt"}


def _save_checkpoint(path: Path, state: dict) -> None:
    save_torch(state, path)  # atomic, with a checksum that load_torch verifies


def _dt_step(model, optimizer, scheduler, batch: dict, grad_clip: float) -> torch.Tensor:
    """One optimiser step on the action MSE over the real (unpadded) timesteps; returns the loss."""
    target = batch["actions"].clone()
    out = model(**batch, return_dict=True)
    mask = batch["attention_mask"].bool()
    loss = torch.mean((out.action_preds[mask] - target[mask]) ** 2)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss


def _finish(args, out: Path, model, env_id: str, step: int, start_step: int, seconds: float, log: list) -> dict:
    """Save ``OUT/model``, evaluate it when asked, write ``OUT/summary.json`` (and the export); the summary."""
    model.eval()
    model.save_pretrained(out / "model")
    summary = {"dataset": args.dataset, "env": env_id, "seed": args.seed, "steps": step,
               "steps_this_run": step - start_step, "seconds_this_run": seconds,
               "steps_per_second": (step - start_step) / max(seconds, 1e-9), "final_loss": log[-1]["loss"] if log else None,
               "settings": {k: v for k, v in vars(args).items() if k not in ("no_progress",)}}
    if args.eval_episodes:
        summary["eval"] = evaluate(out / "model", env_id, args.eval_episodes, args.eval_seed, args.eval_batch)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.export:
        export = Path(args.export)
        if export.exists():
            shutil.rmtree(export)
        shutil.copytree(out / "model", export)
        (export / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def train(args) -> dict:
    """Train (or resume) and save ``OUT/model``; returns the run summary (also ``OUT/summary.json``)."""
    dataset = load_dataset(args.dataset, root=args.root, env_id=args.env)
    env_id = args.env or dataset.env_spec.id
    task = get_task(env_id)
    if args.target_return is None:
        args.target_return = task.target_return
    episodes = episodes_of(dataset)
    mean, std = state_stats(episodes)
    sampler = TrajectorySampler(episodes, mean, std, context=args.context, return_scale=args.return_scale,
                                max_ep_len=args.max_ep_len)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    torch.manual_seed(args.seed)
    model = build_model(sampler.state_dim, sampler.act_dim, args)
    model.config.tokenmem = settings_of(args, env_id, mean, std, args.dataset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / args.warmup, 1.0))
    rng = np.random.default_rng(args.seed)
    step, log, losses = 0, [], []
    if ckpt_path.exists():
        if not args.resume:
            raise TokenmemError(f"{ckpt_path} exists; pass --resume to continue that run or choose another --out")
        state = load_torch(ckpt_path, "DT training checkpoint", "delete it to train from step 0, or restore a copy")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        # the losses since the last log line (a kill between log lines must not drop them from the next one)
        step, log, losses = state["step"], state["log"], state.get("losses", [])
        print(f"resuming {out} at step {step}", flush=True)

    def checkpoint():
        _save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(), "numpy_rng": rng.bit_generator.state,
                                     "torch_rng": torch.get_rng_state(), "step": step, "log": log,
                                     "losses": losses, "args": vars(args)})

    from tqdm import tqdm

    model.train()
    t0, start_step = time.perf_counter(), step
    deadline = None if args.time_limit is None else t0 + 60 * args.time_limit
    bar = tqdm(total=args.steps, initial=step, desc="DT", disable=args.no_progress, mininterval=5)
    while step < args.steps:
        loss = _dt_step(model, optimizer, scheduler, sampler.sample(rng, args.batch_size), args.grad_clip)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - t0
            log.append({"step": step, "loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0],
                        "steps_per_second": (step - start_step) / elapsed})
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            losses = []
        if step % args.checkpoint_every == 0:
            checkpoint()
        if deadline is not None and time.perf_counter() > deadline:
            print(f"time limit of {args.time_limit} min reached at step {step}", flush=True)
            break
    bar.close()
    checkpoint()
    return _finish(args, out, model, env_id, step, start_step, time.perf_counter() - t0, log)


def evaluate(model_path, env_id: str, episodes: int, seed: int, batch: int) -> dict:
    """Reference-loop rollouts (the official example's) over ``episodes`` seeds; D4RL-normalised scores."""
    from tokenmem.adapters.decision import DecisionAdapter, ReferencePolicy

    from .rollout import rollout

    from .mujoco_tasks import make_env

    adapter = DecisionAdapter.from_pretrained(str(model_path))
    returns, lengths = [], []
    seeds = list(range(seed, seed + episodes))
    for i in range(0, episodes, batch):
        chunk = seeds[i:i + batch]
        result = rollout(adapter, ReferencePolicy(adapter), [make_env(env_id) for _ in chunk], chunk)
        returns += result.returns.tolist()
        lengths += result.lengths.tolist()
    from .mujoco_tasks import normalised_score

    scores = normalised_score(env_id, returns)
    print(f"evaluation over {episodes} seeds: return {np.mean(returns):.1f} ± {np.std(returns):.1f}, "
          f"normalised {scores.mean():.1f} ± {scores.std():.1f}", flush=True)
    return {"seeds": seeds, "returns": returns, "lengths": lengths, "score_mean": float(scores.mean()),
            "score_std": float(scores.std())}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenmem.envs.train_dt", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="Minari dataset id, e.g. tokenmem/hopper/medium-v0")
    p.add_argument("--root", default=None, help="Minari root (default $MINARI_DATASETS_PATH)")
    p.add_argument("--env", default=None, help="check the dataset against this env id (default: the dataset's)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100_000, help="gradient steps (the paper: 10 x 10k)")
    p.add_argument("--time-limit", type=float, default=None, help="minutes; stop (and save) when exceeded")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10_000)
    p.add_argument("--grad-clip", type=float, default=0.25)
    p.add_argument("--context", type=int, default=20, help="K")
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--return-scale", type=float, default=1000.0)
    p.add_argument("--max-ep-len", type=int, default=1000)
    p.add_argument("--target-return", type=float, default=None, help="evaluation target (default: the task's, 3600 for Hopper)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-episodes", type=int, default=0, help="reference-loop evaluation episodes after training")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--eval-batch", type=int, default=10, help="episodes rolled out together")
    p.add_argument("--export", default=None, help="copy the trained model (+ training.json) to this directory")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        train(args)
    except TokenmemError as exc:
        print(f"tokenmem: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
