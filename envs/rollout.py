"""Episodes of a Decision Transformer in gymnasium environments: :func:`rollout` drives a batch of
environments with a policy of :mod:`tokenmem.adapters.decision` (the reference loop or the cached one under a
:class:`~tokenmem.TokenMemory`) and returns the returns, lengths, actions and D4RL-normalised scores.

The environment side of the Decision Transformer: it imports the adapter (never the other way round).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmem.adapters.decision import CachedPolicy, DecisionAdapter, ReferencePolicy
from tokenmem.errors import TokenmemError
from tokenmem.memory import TokenMemory

from .mujoco_tasks import get_task, normalised_score


@dataclass
class RolloutResult:
    env_id: str | None
    seeds: list[int]
    returns: np.ndarray  # [b]
    lengths: np.ndarray  # [b]
    actions: list[np.ndarray]  # per episode [T_i, act_dim]
    seconds: float
    memory: TokenMemory | None = None
    frames: list = field(default_factory=list)  # rgb frames of episode 0 when rendering

    @property
    def scores(self) -> np.ndarray:
        """D4RL-normalised scores (needs a supported env id)."""
        return normalised_score(self.env_id, self.returns)

    @property
    def steps_per_second(self) -> float:
        return float(self.lengths.sum()) / max(self.seconds, 1e-9)


def rollout(adapter: DecisionAdapter, policy, envs, seeds, *, max_steps: int | None = None,
            target_return: float | None = None, render: bool = False, progress=None) -> RolloutResult:
    """Run one episode in each of ``envs`` (a batch through ``policy``; episode ``i`` is reset with
    ``seeds[i]``) and return the episodes' returns, lengths and actions. The return-to-go starts at
    ``target_return / return_scale`` and drops by ``reward / return_scale`` each step (float32), as in the
    official example. ``progress`` (e.g. a tqdm bar) is advanced once per step."""
    envs, seeds = list(envs), [int(s) for s in seeds]
    if not envs or len(envs) != len(seeds):
        raise TokenmemError(f"rollout needs one seed per environment, got {len(envs)} envs and {len(seeds)} seeds")
    for env in envs:
        adapter.check_env(env)
    env_id = getattr(getattr(envs[0], "spec", None), "id", None) or adapter.env_id
    if max_steps is None:
        max_steps = getattr(getattr(envs[0], "spec", None), "max_episode_steps", None) or adapter.max_ep_len
    if max_steps > adapter.max_ep_len:
        raise TokenmemError(f"episodes of {max_steps} steps need timestep embeddings up to {max_steps - 1} but the "
                            f"model has max_ep_len={adapter.max_ep_len}; lower max_steps")
    target = adapter.target_return if target_return is None else target_return
    if target is None and adapter.env_id is not None:  # the paper's target for the adapter's task
        target = get_task(adapter.env_id).target_return
    if target is None:
        raise TokenmemError("no target return: pass target_return=... (or an adapter with env_id or a saved target)")
    b = len(envs)
    obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)])
    rtg = torch.full((b,), float(target) / adapter.return_scale, dtype=torch.float32)
    alive = torch.ones(b, dtype=torch.bool)
    returns, lengths = np.zeros(b), np.zeros(b, dtype=np.int64)
    actions = [[] for _ in range(b)]
    frames = [envs[0].render()] if render else []
    policy.start(b)
    start = time.perf_counter()
    for t in range(max_steps):
        action = policy.act(t, rtg, adapter.normalise(obs), alive).to(torch.float32)
        for i in torch.nonzero(alive).flatten().tolist():
            a = action[i].numpy()
            o, reward, terminated, truncated, _ = envs[i].step(a)
            obs[i] = o
            actions[i].append(a.copy())
            returns[i] += reward
            lengths[i] += 1
            rtg[i] = rtg[i] - torch.tensor(reward / adapter.return_scale, dtype=torch.float32)
            if terminated or truncated:
                alive[i] = False
            if render and i == 0:
                frames.append(envs[0].render())
        if progress is not None:
            progress.update(1)
        if not bool(alive.any()):
            break
    seconds = time.perf_counter() - start
    acts = [np.stack(a) if a else np.zeros((0, adapter.act_dim), np.float32) for a in actions]
    return RolloutResult(env_id, seeds, returns, lengths, acts, seconds, getattr(policy, "memory", None), frames)


def make_policy(adapter: DecisionAdapter, evictor: str | None, budget=None, interval=None, **options):
    """``evictor="reference"`` (or None): the reference loop; any evictor name: a cached policy."""
    if evictor in (None, "reference"):
        if budget is not None:
            raise TokenmemError("the reference loop has no budget; its window is the adapter's context (K)")
        return ReferencePolicy(adapter)
    return CachedPolicy(adapter, evictor, budget, interval, **options)

