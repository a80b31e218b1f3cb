"""``random``: keeps a uniformly random subset (a baseline that any useful evictor must beat)."""

import torch

from tokenmem.evictor import Evictor, LayerView, register_evictor


@register_evictor("random")
class RandomEvictor(Evictor):
    name = "random"
    description = "baseline: keeps a uniformly random subset of tokens (seeded)"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, view: LayerView) -> torch.Tensor:
        shape = view.meta.position.shape
        return torch.rand(shape, generator=self.generator).to(view.keys.device)

    def __repr__(self) -> str:
        return f"RandomEvictor(seed={self.seed})"
