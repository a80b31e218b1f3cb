"""``knorm``: the key-norm baseline -- keep the keys with the lowest L2 norm.

Devoto, Zhao, Scardapane, Minervini, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(EMNLP 2024, arXiv:2406.11430): keys with a low L2 norm receive high attention, so the low-norm keys are kept
(the score is minus the norm, computed in float32 as kvpress's ``KnormPress`` does). RoPE rotations preserve
the norm, so ``positions="shift"`` does not change the decision. No attention statistics are read
(``needs_stats`` False, ``stats_window`` 0).
"""

from __future__ import annotations

import torch

from tokenmem.evictor import Evictor, LayerView, register_evictor
from tokenmem.scoring import average_heads


@register_evictor("knorm")
class KnormEvictor(Evictor):
    name = "knorm"
    description = "Knorm: keeps the keys with the lowest L2 norm; no attention statistics"
    needs_stats = False
    stats_window = 0

    def __init__(self, average_heads: bool = False):
        self.average_heads = average_heads

    def score(self, view: LayerView) -> torch.Tensor:
        scores = -torch.linalg.vector_norm(view.keys, dim=-1, dtype=torch.promote_types(view.keys.dtype, torch.float32))
        return average_heads(scores, view.meta.valid) if self.average_heads else scores

    def __repr__(self) -> str:
        return f"KnormEvictor(average_heads={self.average_heads})"
