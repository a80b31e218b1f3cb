"""``pyramid``: PyramidKV -- layer budgets that shrink with depth at the same total, around any scorer.

Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling" (2024, arXiv:2406.02069): attention is spread widely in the lower layers and
concentrates on a few tokens in the upper ones, so lower layers get larger budgets. Layer ``l`` of ``L`` keeps
``b_l`` tokens per KV head, linear from ``2A - A/beta`` (layer 0) down to ``A/beta`` (layer ``L - 1``), where ``A``
is the mean -- the schedule of the paper's code and of kvpress's ``PyramidKVPress`` -- with integer budgets that
sum to exactly ``L * A`` (kvpress rounds each layer on its own and falls back to a uniform budget when the
smallest layer cannot hold SnapKV's window; neither is done here). Which tokens a layer keeps is the wrapped
scorer's choice (default ``snapkv``; options other than ``scorer``, ``beta``, ``average`` and ``num_layers`` go
to it), and the scorer sees its layer's budget.

``TokenMemory(model, "pyramid", budget=B)`` spends the memory's budget as the mean, ``A = B``: the layers hold
``L * B`` tokens per KV head in all, as a uniform evictor at ``budget=B`` does, but layer 0 holds about ``2B`` and
the last layer ``B / beta`` (:meth:`PyramidEvictor.layer_budget` tells the memory each layer's share; a float
budget is resolved for the tokens seen first). With an explicit ``average=A`` the mean is ``A`` and the memory's
budget caps every layer instead (layers above the cap are held at it and the surplus goes to the deeper
layers, so the total stays ``L * A`` while ``L * cap`` allows it; ``budget=None``: no cap).

Held as a threshold evictor: scores +1 on the tokens a layer's allocation keeps, -1 elsewhere (see
:class:`tokenmem.scoring.Allocator`); every head of a layer keeps the same count. Tokens the scorer or an adapter
protects are kept even beyond a layer's share (up to the memory's budget, where a uniform evictor would raise
:class:`~tokenmem.BudgetError`): a deep layer whose share is smaller than a protected question or, with
``evict_unit="segment"``, than the whole frames around the scorer's window, holds more than its share (the
scorer's own window shrinks to the share; kvpress instead falls back to uniform budgets when the smallest layer
cannot hold the window).
"""

from __future__ import annotations

import torch

from tokenmem.errors import TokenmemError
from tokenmem.evictor import LayerView, register_evictor
from tokenmem.scoring import (Allocator, keep_counts, memory_layer_count, pyramid_budgets, replace_budget,
                              resolve_budget_at)


@register_evictor("pyramid")
class PyramidEvictor(Allocator):
    name = "pyramid"
    description = "PyramidKV: layer budgets shrinking with depth at the same total, around a scorer (snapkv)"

    def __init__(self, scorer="snapkv", beta: float = 20, average=None, num_layers: int | None = None,
                 **scorer_options):
        super().__init__(scorer, average, **scorer_options)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 1:
            raise TokenmemError(f"beta must be a number >= 1 (the pyramid's steepness), got {beta!r}")
        self.beta = beta
        self.num_layers = num_layers
        self._schedules: dict[tuple, list[int]] = {}

    def budgets(self, budget: int, cap: int | None, seen: int, memory) -> list[int]:
        """Every layer's budget (tokens per KV head) for the memory's budget ``budget`` (its cap ``cap`` when
        ``average`` is given) after ``seen`` tokens."""
        mean = resolve_budget_at(self.average, budget, seen)
        cap = None if self.average is None else cap
        key = (mean, memory_layer_count(memory, self.num_layers), cap)
        if key not in self._schedules:  # asked at every attention call of every layer
            if len(self._schedules) > 256:
                self._schedules.clear()
            self._schedules[key] = pyramid_budgets(key[0], key[1], self.beta, cap=cap)
        return self._schedules[key]

    def layer_budgets(self, view: LayerView) -> list[int]:
        """Every layer's budget (tokens per KV head) at this eviction."""
        return self.budgets(view.budget, self.cap(view), view.seen, view.memory)

    def layer_budget(self, budget: int, layer: int, memory) -> tuple[int, int]:
        share = self.budgets(budget, budget, memory.layers[layer].seen, memory)[layer]
        # the layer spends its share; it may hold up to the memory's budget (or its larger share) when the tokens
        # protected (an adapter's protected span, whole segments) outnumber a small share
        return max(1, share), budget if self.average is not None else max(share, budget)

    def scorer_view(self, view: LayerView) -> LayerView:
        return replace_budget(view, self.layer_budgets(view)[view.layer])

    def allocate(self, view: LayerView, scores: torch.Tensor, protect: torch.Tensor) -> torch.Tensor:
        return keep_counts(scores, protect, view.meta.valid, self.layer_budgets(view)[view.layer])

    def __repr__(self) -> str:
        return f"PyramidEvictor(scorer={self.scorer!r}, beta={self.beta}, average={self.average})"
