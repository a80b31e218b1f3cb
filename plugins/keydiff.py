"""``keydiff``: KeyDiff -- keep the keys least similar to the mean key.

Park, Jones, Morse, Goel, Lee, Lott, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments" (2025, arXiv:2504.15364): keys that point away from the
layer's average key direction are the distinctive ones that attention singles out, so a token scores minus the
cosine similarity between its key and the anchor, the mean of the (L2-normalised) keys held by its KV head.
The anchor is taken over real tokens only (padding and masked slots are left out). As kvpress's
``KeyDiffPress``, this is the one-shot rule; the paper's block-wise iteration is what a small ``interval``
does in a stream.

It reads no attention statistics at all: ``needs_stats`` is False and ``stats_window`` 0, so the memory
computes no attention mass and keeps no attention rows for it.
"""

from __future__ import annotations

import torch

from tokenmem.evictor import Evictor, LayerView, register_evictor
from tokenmem.scoring import average_heads, key_distinctiveness


@register_evictor("keydiff")
class KeyDiffEvictor(Evictor):
    name = "keydiff"
    description = "KeyDiff: keeps keys least similar (cosine) to the mean key; no attention statistics"
    needs_stats = False
    stats_window = 0

    def __init__(self, average_heads: bool = False):
        self.average_heads = average_heads

    def score(self, view: LayerView) -> torch.Tensor:
        valid = view.meta.valid  # [b, h, n]
        scores = key_distinctiveness(view.keys, valid)
        return average_heads(scores, valid) if self.average_heads else scores

    def __repr__(self) -> str:
        return f"KeyDiffEvictor(average_heads={self.average_heads})"
