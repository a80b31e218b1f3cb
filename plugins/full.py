"""``full``: keeps every token (the no-eviction baseline)."""

import torch

from tokenmem.evictor import Evictor, LayerView, register_evictor


@register_evictor("full")
class FullEvictor(Evictor):
    name = "full"
    description = "keeps every token (no eviction; the DynamicCache baseline)"
    evicts = False

    def score(self, view: LayerView) -> torch.Tensor:
        return torch.zeros(view.meta.position.shape, device=view.keys.device)
