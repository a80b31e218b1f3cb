"""``ada``: AdaKV -- one layer budget shared by the KV heads by score, around any scorer.

Feng, Lv, Cao, Xie, Zhou, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference" (2024, arXiv:2407.11550): heads differ in how concentrated their attention is, so instead of
``A`` tokens in every head, a layer keeps its ``H * A`` best-scored tokens over all its ``H`` KV heads (per batch
row), and each head first keeps its best ``alpha * A`` tokens (the safeguard, kvpress's ``alpha_safeguard``,
at least 1). Heads then hold different counts. ``A`` is ``average`` (default: the memory's budget); which tokens
score well is the wrapped scorer's choice (default ``snapkv``, whose scores -- attention probabilities -- are
comparable across heads, as the method needs; options other than ``scorer``, ``alpha`` and ``average`` go to it).
The scorer's protected tokens (SnapKV's window) come first and count in the budget, as kvpress's
``AdaKVPress`` ranks them first (it scores SnapKV's window above every other key).

``TokenMemory(model, "ada", budget=B)`` spends the memory's budget as the mean, ``A = B``: every layer holds
``H * B`` tokens per batch row, as a uniform evictor at ``budget=B`` does, but one head may hold more than ``B``
and another fewer (:meth:`AdaEvictor.layer_budget` tells the memory so; a float budget is resolved for the
tokens seen first). With an explicit ``average=A`` the mean is ``A`` and the memory's budget caps every head
instead (``budget=None``: no cap).

Held by masking as NAMM is held: a threshold evictor whose scores are +1 on exactly the kept tokens (see
:class:`tokenmem.scoring.Allocator`); the memory keeps the largest head's count in every head and masks the
surplus slots, so the bytes allocated follow the fullest head, while ``TokenMemory.stats()`` counts what each
head really holds (``held_per_head``; ``held``: their mean, ``B`` per layer; ``kv_bytes``: the valid keys and
values; ``held_slots`` and ``bytes``: what is allocated).
"""

from __future__ import annotations

import torch

from tokenmem.errors import TokenmemError
from tokenmem.evictor import LayerView, register_evictor
from tokenmem.scoring import Allocator, replace_budget, resolve_budget, resolve_budget_at, share_across_heads


@register_evictor("ada")
class AdaEvictor(Allocator):
    name = "ada"
    description = "AdaKV: one layer budget shared across KV heads by score (ragged heads), around a scorer (snapkv)"

    def __init__(self, scorer="snapkv", alpha: float = 0.2, average=None, **scorer_options):
        super().__init__(scorer, average, **scorer_options)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise TokenmemError(f"alpha (the per-head safeguard fraction) must lie in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def head_budget(self, view: LayerView) -> int:
        return resolve_budget(self.average, view)

    def layer_budget(self, budget: int, layer: int, memory) -> tuple[int, int]:
        if self.average is not None:  # the mean is `average`, the memory's budget caps every head
            return min(resolve_budget_at(self.average, budget, memory.layers[layer].seen), budget), budget
        buffer = memory.layers[layer].key_buffer
        heads = 1 if buffer is None else buffer.shape[1]
        return budget, heads * budget  # the layer holds heads x budget; one head may take the layer's whole share

    def scorer_view(self, view: LayerView) -> LayerView:
        return replace_budget(view, min(self.head_budget(view), int(view.budget)))

    def allocate(self, view: LayerView, scores: torch.Tensor, protect: torch.Tensor) -> torch.Tensor:
        mean = self.head_budget(view)
        heads = scores.shape[1]
        floor = int(mean * self.alpha)
        if self.alpha > 0:
            floor = max(1, floor)
        return share_across_heads(scores, protect, view.meta.valid, heads * mean, floor=floor, cap=self.cap(view))

    def __repr__(self) -> str:
        return f"AdaEvictor(scorer={self.scorer!r}, alpha={self.alpha}, average={self.average})"
