"""``tova``: TOVA -- the newest query's attention, averaged over the heads of a layer.

Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs" (EMNLP 2024, arXiv:2401.06104),
Token Omission Via Attention: when the cache is over its budget, drop the tokens the current (newest) query
attends to least, with the attention averaged over all the heads of the layer, so every head of a layer keeps
the same tokens. The newest token itself is kept (kvpress's ``TOVAPress`` does the same; the paper's cache
does not force it, but the newest token's own attention weight is usually high).

The newest query's attention row comes from the memory's row window (``stats_window = 1``, never consumed);
GQA rows are already the mean over each KV head's query group, so their mean over KV heads is the mean over
all query heads. The paper evicts one token per generated token: ``default_interval = 1`` does the same
(``interval=`` trades that for speed: the newest query then ranks ``interval`` tokens at once).
"""

from __future__ import annotations

import torch

from tokenmem.evictor import Evictor, LayerView, register_evictor
from tokenmem.scoring import average_heads, check_count, window_attention


@register_evictor("tova")
class TOVAEvictor(Evictor):
    name = "tova"
    description = "TOVA: attention of the newest query, averaged over the layer's heads (one decision per layer)"
    stats_window = 1
    default_interval = 1

    def __init__(self, rows_chunk: int = 128):
        check_count("rows_chunk", rows_chunk, 0)
        self.rows_chunk = rows_chunk

    def score(self, view: LayerView) -> torch.Tensor:
        return average_heads(window_attention(view, 1), view.meta.valid)

    def protect(self, view: LayerView) -> torch.Tensor:
        return view.newest(1)

    def __repr__(self) -> str:
        return "TOVAEvictor()"
