"""``sink``: StreamingLLM attention sinks + a recent window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024,
arXiv:2309.17453): keeping the first few tokens (which absorb surplus attention) together with a
window of the most recent tokens keeps perplexity stable on unbounded streams.
"""

import torch

from tokenmem.errors import BudgetError
from tokenmem.evictor import Evictor, LayerView, register_evictor


@register_evictor("sink")
class SinkEvictor(Evictor):
    name = "sink"
    description = "StreamingLLM: n_sink=4 initial tokens + the most recent ones"

    def __init__(self, n_sink: int = 4):
        if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
            raise BudgetError(f"n_sink must be an int >= 0, got {n_sink!r}")
        self.n_sink = n_sink

    def check_budget(self, budget: int) -> None:
        if budget <= self.n_sink:
            raise BudgetError(
                f"budget {budget} leaves no room for recent tokens next to {self.n_sink} sink tokens; "
                f"use a budget > {self.n_sink} or fewer sinks (n_sink)"
            )

    def score(self, view: LayerView) -> torch.Tensor:
        return view.meta.position.to(torch.float32)

    def protect(self, view: LayerView) -> torch.Tensor:
        return view.first_valid(self.n_sink) | view.meta.is_sink

    def __repr__(self) -> str:
        return f"SinkEvictor(n_sink={self.n_sink})"
