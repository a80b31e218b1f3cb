"""NAMM: Neural Attention Memory Models (Cetin et al., "An Evolved Universal Transformer Memory",
2024, arXiv:2410.13166) as a tokenmem evictor: features, scorer, evolution, scorer files."""

from .config import NAMMConfig
from .evictor import NAMM, SCORER_DIRS, load_scorer, register_scorer_dir, save_scorer

__all__ = ["NAMM", "NAMMConfig", "SCORER_DIRS", "load_scorer", "register_scorer_dir", "save_scorer"]
