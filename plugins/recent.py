"""``recent``: a sliding window over the newest tokens."""

import torch

from tokenmem.evictor import Evictor, LayerView, register_evictor


@register_evictor("recent")
class RecentEvictor(Evictor):
    name = "recent"
    description = "sliding window: keeps the most recent tokens"

    def score(self, view: LayerView) -> torch.Tensor:
        return view.meta.position.to(torch.float32)
