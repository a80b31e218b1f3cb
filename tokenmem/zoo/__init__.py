"""The models and data tokenmem trains and ships itself (no hub downloads are possible here).

- :mod:`tokenmem.zoo.corpus`: a deterministic corpus of the Python standard library's source files.
- :mod:`tokenmem.zoo.train_lm`: trains the small Llama-architecture language model shipped in
  ``tokenmem/zoo/models/stdlib-llama`` (its probes and evaluation: :mod:`tokenmem.zoo.lm_eval`).
- :mod:`tokenmem.zoo.lm_tasks`: long-context language tasks built from held-out files.
- :mod:`tokenmem.zoo.video_task` / :mod:`tokenmem.zoo.train_video`: procedural video-QA clips and the trainer of the
  tiny LLaVA-NeXT-Video model shipped in ``tokenmem/zoo/models/shapes-llava-video`` (its architecture, tokenizer and
  batches: :mod:`tokenmem.zoo.video_model`), and of the tiny Qwen2-VL model shipped in
  ``tokenmem/zoo/models/shapes-qwen2vl-video`` (:mod:`tokenmem.zoo.qwen2vl_model`; ``train_video --arch qwen2vl``).
- :mod:`tokenmem.zoo.transfer`: the zero-shot transfer benchmark (``tokenmem bench``); :mod:`tokenmem.zoo.demo`:
  ``tokenmem demo``.

The training scripts (``train_lm``, ``train_video``, ``evolve_language``) run as modules (``python -m``) and are
never imported by the library; importing this package loads only the paths below.
"""

from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
MODELS_DIR = ZOO_DIR / "models"
DATA_DIR = ZOO_DIR / "data"
STDLIB_LM = MODELS_DIR / "stdlib-llama"
SCORERS_DIR = ZOO_DIR / "scorers"
VIDEO_LM = MODELS_DIR / "shapes-llava-video"
VIDEO_QWEN2VL = MODELS_DIR / "shapes-qwen2vl-video"


def stdlib_lm_path() -> Path:
    """The shipped standard-library language model (a local ``from_pretrained`` directory)."""
    from ..errors import TokenmemError

    if not (STDLIB_LM / "config.json").exists():
        raise TokenmemError(f"the shipped language model is missing at {STDLIB_LM}; recreate it with "
                            "`python -m tokenmem.zoo.train_lm` or reinstall tokenmem from a full checkout")
    return STDLIB_LM


def video_lm_path() -> Path:
    """The shipped tiny video-QA model (LLaVA-NeXT-Video architecture; a local ``from_pretrained`` directory)."""
    from ..errors import TokenmemError

    if not (VIDEO_LM / "config.json").exists():
        raise TokenmemError(f"the shipped video model is missing at {VIDEO_LM}; recreate it with "
                            "`python -m tokenmem.zoo.train_video --export ...` (see its docstring) or reinstall "
                            "tokenmem from a full checkout")
    return VIDEO_LM


def video_qwen2vl_path() -> Path:
    """The shipped tiny video-QA model of the Qwen2-VL architecture (a local ``from_pretrained`` directory)."""
    from ..errors import TokenmemError

    if not (VIDEO_QWEN2VL / "config.json").exists():
        raise TokenmemError(f"the shipped Qwen2-VL video model is missing at {VIDEO_QWEN2VL}; recreate it with "
                            "`python -m tokenmem.zoo.train_video --arch qwen2vl --export ...` (see its docstring) or "
                            "reinstall tokenmem from a full checkout")
    return VIDEO_QWEN2VL
