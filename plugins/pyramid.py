"""``pyramid``: PyramidKV -- layer budgets that shrink with depth at the same total, around any scorer.

Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling" (2024, arXiv:2406.02069): attention is spread widely in the lower layers and
concentrates on a few tokens in the upper ones, so lower layers get larger budgets. Layer ``l`` of ``L`` keeps
``b_l`` tokens per KV head, linear from ``2A - A/beta`` (layer 0) down to ``A/beta`` (layer ``L - 1``), where ``A``
is the mean (``average``, default: the memory's budget) -- the schedule of the paper's code and of kvpress's
``PyramidKVPress`` -- with integer budgets that sum to exactly ``L * A`` (kvpress rounds each layer on its own
and falls back to a uniform budget when the smallest layer cannot hold SnapKV's window; neither is done here).
Which tokens a layer keeps is the wrapped scorer's choice (default ``snapkv``; options other than ``scorer``,
``beta``, ``average`` and ``num_layers`` go to it), and the scorer sees its layer's budget.

Held as a threshold evictor: scores +1 on the tokens a layer's allocation keeps, -1 elsewhere (see
:class:`tokenmem.scoring.Allocator`). Today's ``TokenMemory`` caps every layer at its ``budget``: layers whose
pyramid budget is above the cap are held at it and the surplus goes to the deeper layers (the total stays
``L * A`` while ``L * cap`` allows it). So ``TokenMemory(model, "pyramid", budget=B)`` alone is a uniform
allocation; for PyramidKV give the memory a cap above the mean, e.g. ``budget=2 * A, average=A``, or
``budget=None, average=A`` (the memory then evicts every ``interval`` tokens).
"""

from __future__ import annotations

import torch

from tokenmem.evictor import LayerView, register_evictor
from tokenmem.scoring import Allocator, budget_cap, keep_counts, layer_count, pyramid_budgets, replace_budget, resolve_budget


@register_evictor("pyramid")
class PyramidEvictor(Allocator):
    name = "pyramid"
    description = "PyramidKV: layer budgets shrinking with depth at the same total, around a scorer (snapkv)"

    def __init__(self, scorer="snapkv", beta: float = 20, average=None, num_layers: int | None = None,
                 **scorer_options):
        super().__init__(scorer, average, **scorer_options)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 1:
            from tokenmem.errors import TokenmemError

            raise TokenmemError(f"beta must be a number >= 1 (the pyramid's steepness), got {beta!r}")
        self.beta = beta
        self.num_layers = num_layers

    def layer_budgets(self, view: LayerView) -> list[int]:
        """Every layer's budget (tokens per KV head) at this eviction."""
        cap = budget_cap(view)
        return pyramid_budgets(resolve_budget(self.average, view), layer_count(view, self.num_layers), self.beta,
                               cap=cap)

    def scorer_view(self, view: LayerView) -> LayerView:
        return replace_budget(view, self.layer_budgets(view)[view.layer])

    def allocate(self, view: LayerView, scores: torch.Tensor, protect: torch.Tensor) -> torch.Tensor:
        return keep_counts(scores, protect, view.meta.valid, self.layer_budgets(view)[view.layer])

    def __repr__(self) -> str:
        return f"PyramidEvictor(scorer={self.scorer!r}, beta={self.beta}, average={self.average})"
