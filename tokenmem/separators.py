"""Separator tokens (SepLLM): which token ids a tokenizer's separators have.

The memory flags these tokens (``TokenMeta`` flag ``separator``) when it knows the ids; evictors that read
the flag declare ``needs_separators``. Separators are the vocabulary entries whose text is one of
``. , ? ! ; : space tab newline``, with or without a leading space marker.
"""

from __future__ import annotations

import os

SEPARATOR_TEXTS = (".", ",", "?", "!", ";", ":", " ", "\t", "\n")
_SPACE_MARKERS = (" ", "\u0120", "\u2581")  # plain space, byte-level 'Ġ', sentencepiece '▁'


def separator_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's separator tokens (see module docstring)."""
    vocab = tokenizer.get_vocab()
    ids = sorted(vocab.values())
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    raw = tokenizer.convert_ids_to_tokens(ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    found = []
    for i, text, token in zip(ids, texts, raw):
        if i in special:
            continue
        for candidate in (text, token):
            if candidate is None:
                continue
            stripped = candidate[1:] if len(candidate) > 1 and candidate[0] in _SPACE_MARKERS else candidate
            if candidate in SEPARATOR_TEXTS or stripped in SEPARATOR_TEXTS or candidate in _SPACE_MARKERS[1:]:
                found.append(i)
                break
    return found


def local_tokenizer(model):
    """``(tokenizer, None)`` for the tokenizer saved beside a locally loaded model, else ``(None, reason)``."""
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path or not os.path.isdir(path):
        return None, f"the model was not loaded from a local directory ({path!r})"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path), None
    except (OSError, ValueError) as exc:  # no tokenizer files there: reported by the caller if it matters
        return None, f"{type(exc).__name__}: {exc}"
