"""tokenmem: a bounded, learned working memory for any transformer.

>>> import tokenmem
>>> memory = tokenmem.TokenMemory(model, evictor="sink", budget=256, interval=64, positions="original")
>>> out = model.generate(input_ids, attention_mask=mask, **tokenmem.cache_kwargs(model, memory), max_new_tokens=64)
>>> memory.stats()

``cache_kwargs`` passes the memory as ``cache=`` on transformers >= 5.24 and as ``past_key_values=`` before.
"""

from .compat import cache_keyword, cache_kwargs
from .config import MemoryConfig
from .errors import (BudgetError, CorruptFileError, InputError, MemoryStateError, TokenmemError, UnknownEvictorError,
                     UnsupportedModelError)
from .evictor import Evictor, LayerView, get_evictor, list_evictors, register_evictor
from .memory import TokenMemory
from .meta import MODALITIES, TokenMeta
from .model import prepare_model, restore_model
from .selection import select_kept

# Top-down registration: the package (not the core modules) loads the built-in evictors, and tells the NAMM
# plugin where the scorers tokenmem ships live.
from . import plugins  # noqa: E402  (registers full, recent, sink, separator, h2o, random, namm)
from .zoo import SCORERS_DIR as _SHIPPED_SCORERS  # noqa: E402

plugins.namm.register_scorer_dir(_SHIPPED_SCORERS)

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CorruptFileError",
    "Evictor",
    "InputError",
    "LayerView",
    "MODALITIES",
    "MemoryConfig",
    "MemoryStateError",
    "TokenMemory",
    "TokenMeta",
    "TokenmemError",
    "UnknownEvictorError",
    "UnsupportedModelError",
    "cache_keyword",
    "cache_kwargs",
    "get_evictor",
    "list_evictors",
    "prepare_model",
    "register_evictor",
    "restore_model",
    "select_kept",
]
