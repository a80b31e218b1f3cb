"""The models and data tokenmem trains and ships itself (no hub downloads are possible here).

- :mod:`tokenmem.zoo.corpus`: a deterministic corpus of the Python standard library's source files.
- :mod:`tokenmem.zoo.train_lm`: trains the small Llama-architecture language model shipped in
  ``tokenmem/zoo/models/stdlib-llama``.
- :mod:`tokenmem.zoo.lm_tasks`: long-context language tasks built from held-out files.
"""

from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
MODELS_DIR = ZOO_DIR / "models"
DATA_DIR = ZOO_DIR / "data"
STDLIB_LM = MODELS_DIR / "stdlib-llama"
SCORERS_DIR = ZOO_DIR / "scorers"


def stdlib_lm_path() -> Path:
    """The shipped standard-library language model (a local ``from_pretrained`` directory)."""
    from ..errors import TokenmemError

    if not (STDLIB_LM / "config.json").exists():
        raise TokenmemError(f"the shipped language model is missing at {STDLIB_LM}; recreate it with "
                            "`python -m tokenmem.zoo.train_lm` or reinstall tokenmem from a full checkout")
    return STDLIB_LM
