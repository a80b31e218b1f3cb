"""``separator``: SepLLM's initial + separator + neighbouring tokens.

Chen et al., "SepLLM: Accelerate Large Language Models by Compressing One Segment into One
Separator" (ICML 2025, arXiv:2412.12094): the attention a segment receives concentrates on its
separator (punctuation, whitespace), so the cache keeps the first tokens, every separator and a
window of recent neighbours. When separators alone exceed the budget we keep the newest ones, as
SepCache does when streaming.
"""

import torch

from tokenmem.errors import BudgetError
from tokenmem.evictor import Evictor, LayerView, check_positive_count, register_evictor, resolve_count

#: Separators rank above every other evictable token, newest first.
_SEPARATOR_BONUS = float(2**40)


@register_evictor("separator")
class SeparatorEvictor(Evictor):
    name = "separator"
    needs_separators = True
    description = "SepLLM: first 3 tokens + every separator (. , ? ! ; : space tab newline) + recent tokens"

    def __init__(self, n_initial: int = 3, n_recent: int | float = 0.25):
        check_positive_count("n_recent", n_recent)
        if isinstance(n_initial, bool) or not isinstance(n_initial, int) or n_initial < 0:
            raise BudgetError(f"n_initial must be an int >= 0, got {n_initial!r}")
        self.n_initial = n_initial
        self.n_recent = n_recent

    def check_budget(self, budget: int) -> None:
        recent = resolve_count(self.n_recent, budget)
        if budget < self.n_initial + recent + 1:
            raise BudgetError(
                f"budget {budget} cannot hold {self.n_initial} initial + {recent} recent tokens and any separator; "
                f"use a budget >= {self.n_initial + recent + 1} or smaller n_initial / n_recent"
            )

    def score(self, view: LayerView) -> torch.Tensor:
        score = view.meta.position.to(torch.float32)
        return torch.where(view.meta.is_separator, score + _SEPARATOR_BONUS, score)

    def protect(self, view: LayerView) -> torch.Tensor:
        recent = resolve_count(self.n_recent, view.budget)
        return view.first_valid(self.n_initial) | view.newest(recent)

    def __repr__(self) -> str:
        return f"SeparatorEvictor(n_initial={self.n_initial}, n_recent={self.n_recent})"
