"""NAMM: Neural Attention Memory Models (Cetin et al., "An Evolved Universal Transformer Memory",
2024, arXiv:2410.13166) as a tokenmem evictor: features, scorer, evolution, scorer files."""

from .config import NAMMConfig
from .evictor import NAMM
from .io import load_scorer, save_scorer

__all__ = ["NAMM", "NAMMConfig", "load_scorer", "save_scorer"]
