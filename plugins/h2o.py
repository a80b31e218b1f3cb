"""``h2o``: heavy hitters + a recent window.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, arXiv:2306.14048): tokens that accumulated the most attention mass so far
("heavy hitters") are kept together with the most recent tokens; by default half of the budget
each. The mass comes from the ``tokenmem`` attention statistics (sum over queries, mean over the
query heads of a KV head's group), accumulated per token in evictor state that the memory compacts.
"""

import torch

from tokenmem.evictor import Evictor, LayerView, check_positive_count, register_evictor, resolve_count


@register_evictor("h2o")
class H2OEvictor(Evictor):
    name = "h2o"
    description = "H2O: heavy hitters (accumulated attention mass) + a recent window (half the budget)"
    needs_stats = True

    def __init__(self, recent: int | float = 0.5):
        check_positive_count("recent", recent)
        self.recent = recent

    def state_spec(self):
        return {"h2o_mass": ((), torch.float32)}

    def observe(self, view: LayerView) -> None:
        view.state["h2o_mass"].add_(view.mass)

    def score(self, view: LayerView) -> torch.Tensor:
        return view.state["h2o_mass"]

    def protect(self, view: LayerView) -> torch.Tensor:
        return view.newest(resolve_count(self.recent, view.budget))

    def __repr__(self) -> str:
        return f"H2OEvictor(recent={self.recent})"
