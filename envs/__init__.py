"""tokenmem.envs: gymnasium MuJoCo tasks and D4RL normalisation (:mod:`.mujoco_tasks`), Decision Transformer
episodes (:mod:`.rollout`), Minari datasets, and the scripts that make the offline data (:mod:`.make_dataset`,
SAC behaviour policies) and train a Decision Transformer (:mod:`.train_dt`). Needs ``pip install tokenmem[rl]``
(``tokenmem[train]`` for the scripts). The environment side imports the adapters, never the other way round.
"""

from __future__ import annotations

from pathlib import Path

from .mujoco_tasks import TASKS, Task, check_state_dim, get_task, make_env, normalised_score

MODELS_DIR = Path(__file__).resolve().parent / "models"
SHIPPED_DT = MODELS_DIR / "hopper-medium-dt"
BEHAVIOUR_DIR = Path(__file__).resolve().parent / "behaviour"  # SAC runs' logs + the snapshots datasets came from


def shipped_dt_path() -> Path:
    """The Decision Transformer tokenmem ships (Hopper-v5, trained on the medium dataset)."""
    from tokenmem.errors import TokenmemError

    if not (SHIPPED_DT / "config.json").exists():
        raise TokenmemError(
            f"the shipped Decision Transformer is not at {SHIPPED_DT}; pass --model PATH, or make it with "
            "`python -m tokenmem.envs.make_dataset all --env Hopper-v5 --out runs/hopper-sac --root runs/datasets` "
            "then `python -m tokenmem.envs.train_dt --dataset tokenmem/hopper/medium-v0 --root runs/datasets "
            f"--out runs/dt-hopper --export {SHIPPED_DT}`"
        )
    return SHIPPED_DT


__all__ = ["BEHAVIOUR_DIR", "MODELS_DIR", "SHIPPED_DT", "TASKS", "Task", "check_state_dim", "get_task", "make_env",
           "normalised_score", "shipped_dt_path"]
