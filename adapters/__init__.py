"""tokenmem.adapters: modality -> model inputs + TokenMeta."""

from .text import TextAdapter, load_causal_lm, prefill, separator_ids

__all__ = ["TextAdapter", "load_causal_lm", "prefill", "separator_ids"]
