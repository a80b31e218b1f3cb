"""Offline datasets in Minari's format, and the statistics a Decision Transformer needs from them.

Minari (Farama Foundation, https://github.com/Farama-Foundation/Minari) is the maintained successor of
D4RL's dataset files: a dataset is a directory ``<root>/<namespace>/<env>/<name>-v<N>/data`` opened with
``minari.load_dataset(dataset_id)`` where the root is ``$MINARI_DATASETS_PATH``. Datasets written here
use Minari's own ``create_dataset_from_buffers`` (HDF5 storage), so a user with the real
``mujoco/hopper/medium-v0`` data loads it with the same functions.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from tokenmem.errors import TokenmemError

from .mujoco_tasks import get_task

STATE_STD_EPS = 1e-6  # added to the std as in the Decision Transformer's gym experiment code


def _minari():
    try:
        import minari
    except ImportError as exc:
        raise TokenmemError("Minari datasets need the minari package: `pip install tokenmem[rl]` "
                            "(installs minari[hdf5])") from exc
    return minari


@contextlib.contextmanager
def minari_root(root: str | os.PathLike | None) -> Iterator[None]:
    """Point Minari at ``root`` (``$MINARI_DATASETS_PATH``) for the duration of the block."""
    if root is None:
        yield
        return
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(Path(root).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


@dataclass
class Episode:
    """One recorded episode: ``observations`` has one row more than the others (the final observation)."""

    observations: np.ndarray  # [T + 1, state_dim]
    actions: np.ndarray  # [T, act_dim]
    rewards: np.ndarray  # [T]
    terminations: np.ndarray  # [T] bool
    truncations: np.ndarray  # [T] bool
    seed: int | None = None

    @property
    def ret(self) -> float:
        return float(np.sum(self.rewards))

    def __len__(self) -> int:
        return len(self.rewards)


def write_dataset(dataset_id: str, episodes: Sequence[Episode], env_id: str, *, root=None, algorithm: str,
                  description: str, author: str = "tokenmem", author_email: str = "tokenmem@localhost",
                  code_permalink: str = "tokenmem/envs/make_dataset.py"):
    """Write ``episodes`` as the Minari dataset ``dataset_id`` under ``root`` with Minari's
    ``create_dataset_from_buffers`` (HDF5). Reference scores are D4RL's, so ``minari.get_normalized_score``
    agrees with :func:`tokenmem.envs.normalised_score`. Returns the ``MinariDataset``."""
    minari = _minari()
    from minari.data_collector import EpisodeBuffer

    task = get_task(env_id)
    if not episodes:
        raise TokenmemError(f"no episodes to write for dataset {dataset_id!r}")
    buffers = []
    for i, ep in enumerate(episodes):
        if ep.observations.shape != (len(ep) + 1, task.state_dim) or ep.actions.shape != (len(ep), task.act_dim):
            raise TokenmemError(
                f"episode {i} has observations {ep.observations.shape} and actions {ep.actions.shape}; for {env_id} "
                f"expected ({len(ep) + 1}, {task.state_dim}) and ({len(ep)}, {task.act_dim})"
            )
        buffers.append(EpisodeBuffer(
            id=i, seed=ep.seed, observations=list(ep.observations), actions=list(ep.actions.astype(np.float32)),
            rewards=[float(r) for r in ep.rewards], terminations=[bool(t) for t in ep.terminations],
            truncations=[bool(t) for t in ep.truncations], infos={},
        ))
    with minari_root(root):
        if dataset_id in minari.list_local_datasets():
            raise TokenmemError(
                f"dataset {dataset_id!r} already exists under {root or '$MINARI_DATASETS_PATH'}; delete it with "
                f"`minari delete {dataset_id}` (same MINARI_DATASETS_PATH) or choose another name"
            )
        return minari.create_dataset_from_buffers(
            dataset_id, buffers, env=env_id, eval_env=env_id, algorithm_name=algorithm, author=author, author_email=author_email,
            code_permalink=code_permalink, ref_min_score=task.random_return, ref_max_score=task.expert_return,
            description=description, data_format="hdf5",
        )


def load_dataset(dataset_id: str, *, root=None, env_id: str | None = None):
    """``minari.load_dataset(dataset_id)`` from ``root`` (default ``$MINARI_DATASETS_PATH``); with ``env_id``
    the dataset must come from that environment (same task, same observation and action sizes)."""
    minari = _minari()
    with minari_root(root):
        try:
            dataset = minari.load_dataset(dataset_id)
        except FileNotFoundError as exc:
            where = root or os.environ.get("MINARI_DATASETS_PATH") or "~/.minari/datasets"
            raise TokenmemError(
                f"Minari dataset {dataset_id!r} not found under {where}; create it with "
                "`python -m tokenmem.envs.make_dataset` or point --dataset-root at the directory holding it"
            ) from exc
    if env_id is not None:
        check_dataset_env(dataset, env_id)
    return dataset


def dataset_env_id(dataset) -> str | None:
    spec = dataset.env_spec
    return None if spec is None else spec.id


def check_dataset_env(dataset, env_id: str) -> None:
    """Raise when a Minari dataset was not recorded on ``env_id`` (ids of another version of the same task,
    e.g. ``Hopper-v4`` data for ``Hopper-v5``, are accepted when the spaces have the same shapes)."""
    task = get_task(env_id)
    recorded = dataset_env_id(dataset)
    obs = tuple(dataset.observation_space.shape or ())
    act = tuple(dataset.action_space.shape or ())
    same_task = recorded is not None and recorded.split("-")[0] == env_id.split("-")[0]
    if not same_task or obs != (task.state_dim,) or act != (task.act_dim,):
        raise TokenmemError(
            f"dataset {dataset.id!r} was recorded on {recorded or 'an unknown environment'} (observations {obs}, "
            f"actions {act}) but {env_id} needs observations ({task.state_dim},) and actions ({task.act_dim},); "
            f"use a {task.name} dataset (e.g. tokenmem/{task.name}/medium-v0)"
        )


def episodes_of(dataset) -> list[Episode]:
    """All episodes of a Minari dataset as :class:`Episode` arrays (observations float64 as stored)."""
    out = []
    for ep in dataset.iterate_episodes():
        out.append(Episode(np.asarray(ep.observations), np.asarray(ep.actions), np.asarray(ep.rewards),
                           np.asarray(ep.terminations), np.asarray(ep.truncations)))
    return out


def state_stats(episodes: Sequence[Episode]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the states the policy acted on (every observation but each episode's
    final one), std + 1e-6, as the Decision Transformer's gym code computes them (float64)."""
    if not episodes:
        raise TokenmemError("state statistics need at least one episode")
    states = np.concatenate([ep.observations[:-1] for ep in episodes], axis=0)
    return states.mean(axis=0), states.std(axis=0) + STATE_STD_EPS
