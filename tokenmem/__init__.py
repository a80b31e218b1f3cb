"""tokenmem: a bounded, learned working memory for any transformer.

>>> import tokenmem
>>> memory = tokenmem.TokenMemory(model, evictor="sink", budget=256, interval=64, positions="original")
>>> out = model.generate(input_ids, attention_mask=mask, past_key_values=memory, max_new_tokens=64)
>>> memory.stats()
"""

from .attention import prepare_model, restore_model
from .errors import BudgetError, MemoryStateError, TokenmemError, UnknownEvictorError, UnsupportedModelError
from .evictor import Evictor, LayerView, get_evictor, list_evictors, register_evictor
from .memory import TokenMemory, select_kept
from .meta import MODALITIES, TokenMeta

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "Evictor",
    "LayerView",
    "MODALITIES",
    "MemoryStateError",
    "TokenMemory",
    "TokenMeta",
    "TokenmemError",
    "UnknownEvictorError",
    "UnsupportedModelError",
    "get_evictor",
    "list_evictors",
    "prepare_model",
    "register_evictor",
    "restore_model",
    "select_kept",
]
