"""Gymnasium MuJoCo tasks and D4RL score normalisation.

The tasks are the three locomotion benchmarks of the Decision Transformer paper (Chen et al.,
"Decision Transformer: Reinforcement Learning via Sequence Modeling", NeurIPS 2021, arXiv:2106.01345),
in their gymnasium ``v5`` versions. Normalised scores follow D4RL (Fu et al., "D4RL: Datasets for Deep
Data-Driven Reinforcement Learning", 2020, arXiv:2004.07219; ``d4rl/infos.py`` REF_MIN_SCORE /
REF_MAX_SCORE): ``100 * (return - random) / (expert - random)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenmem.errors import TokenmemError


@dataclass(frozen=True)
class Task:
    env_id: str  # gymnasium id, e.g. "Hopper-v5"
    name: str  # D4RL / Minari name, e.g. "hopper"
    state_dim: int
    act_dim: int
    random_return: float  # D4RL REF_MIN_SCORE
    expert_return: float  # D4RL REF_MAX_SCORE
    target_return: float  # the DT paper's evaluation conditioning return (its higher target)
    max_episode_steps: int = 1000


TASKS: dict[str, Task] = {
    t.env_id: t
    for t in (
        Task("Hopper-v5", "hopper", 11, 3, -20.272305, 3234.3, 3600.0),
        Task("Walker2d-v5", "walker2d", 17, 6, 1.629008, 4592.3, 5000.0),
        Task("HalfCheetah-v5", "halfcheetah", 17, 6, -280.178953, 12135.0, 12000.0),
    )
}


def get_task(env_id: str) -> Task:
    """The :class:`Task` of a supported env id, or a :class:`TokenmemError` listing the supported ones."""
    task = TASKS.get(env_id)
    if task is None:
        by_name = {t.name: t.env_id for t in TASKS.values()}
        base = str(env_id).split("-")[0].lower()
        hint = f" (did you mean {by_name[base]!r}?)" if base in by_name else ""
        raise TokenmemError(
            f"unknown environment id {env_id!r}{hint}; tokenmem supports {', '.join(TASKS)} "
            "(gymnasium MuJoCo tasks, installed with `pip install tokenmem[rl]`)"
        )
    return task


def make_env(env_id: str, *, render_mode: str | None = None, **kwargs):
    """``gymnasium.make(env_id)`` for a supported MuJoCo task, checked against the task's dimensions."""
    task = get_task(env_id)
    try:
        import gymnasium as gym
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise TokenmemError("gymnasium is not installed; `pip install tokenmem[rl]` installs gymnasium[mujoco]") from exc
    try:
        env = gym.make(env_id, render_mode=render_mode, **kwargs)
    except gym.error.DependencyNotInstalled as exc:  # pragma: no cover
        raise TokenmemError(f"{env_id} needs MuJoCo: `pip install tokenmem[rl]` ({exc})") from exc
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    if obs_shape != (task.state_dim,) or act_shape != (task.act_dim,):
        env.close()
        raise TokenmemError(
            f"{env_id} has observations {obs_shape} and actions {act_shape}, expected ({task.state_dim},) and "
            f"({task.act_dim},); the installed gymnasium/MuJoCo version differs from the tested one"
        )
    return env


def normalised_score(env_id: str, returns) -> np.ndarray:
    """D4RL normalised score: ``100 * (return - random) / (expert - random)`` (array-like in, float64 out)."""
    task = get_task(env_id)
    returns = np.asarray(returns, dtype=np.float64)
    return 100.0 * (returns - task.random_return) / (task.expert_return - task.random_return)


def check_state_dim(env_id: str, state_dim: int, *, what: str = "the model") -> None:
    """Raise when ``state_dim`` is not the observation size of ``env_id``."""
    task = get_task(env_id)
    if state_dim != task.state_dim:
        raise TokenmemError(
            f"{what} expects states of dimension {state_dim} but {env_id} observations have {task.state_dim}; "
            f"use a model trained on {env_id} (or an env whose observations have {state_dim} values)"
        )
