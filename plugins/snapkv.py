"""``snapkv``: SnapKV -- the attention of an observation window of the newest queries, pooled over neighbours.

Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen, "SnapKV: LLM Knows What You are Looking for Before
Generation" (NeurIPS 2024, arXiv:2404.14469). The newest ``window`` queries (the observation window) vote for
the keys they attend to: per KV head, the mean of their attention (GQA: averaged over the head's query group),
smoothed by a 1-D pooling over neighbouring keys (``kernel_size``, ``"avg"`` or ``"max"``) so that the
neighbours of an important token stay with it, and the window itself is always kept. The window's own keys
take no part in the pooling (they are zero there, as in the reference implementation and kvpress's
``SnapKVPress``, which pad the pooled scores of the earlier keys with zeros).

The attention rows come from the memory's row window: ``stats_window = window`` and the evictor never consumes
a row, so the memory keeps a sliding window of the newest ``window`` queries' rows (every eviction, prefill or
decode, reads the newest ones). The window and the pooling neighbours count valid tokens only (slots that a
ragged eviction masked, e.g. under ``ada``, are skipped), so a batch row decides as it would alone. The protected window is ``min(window, budget)`` tokens, so a budget smaller
than the window keeps the newest tokens (kvpress refuses a prompt shorter than the window).
Defaults are kvpress's (window 64, kernel 5, average pooling); the paper's code uses a 32-query window and
kernel 7 with max pooling (``TokenMemory(model, "snapkv", budget, window=32, kernel_size=7, pooling="max")``).
"""

from __future__ import annotations

import torch

from tokenmem.evictor import Evictor, LayerView, register_evictor
from tokenmem.scoring import (POOLS, average_heads, check_choice, check_count, newest_valid, pool_tokens,
                              window_attention)


@register_evictor("snapkv")
class SnapKVEvictor(Evictor):
    name = "snapkv"
    description = "SnapKV: pooled attention of the newest `window` queries (64) + the window itself"

    def __init__(self, window: int = 64, kernel_size: int = 5, pooling: str = "avg", average_heads: bool = False,
                 rows_chunk: int = 128):
        check_count("window", window, 1)
        check_count("kernel_size", kernel_size, 1)
        check_count("rows_chunk", rows_chunk, 0)
        check_choice("pooling", pooling, POOLS)
        self.window, self.kernel_size, self.pooling = window, kernel_size, pooling
        self.average_heads = average_heads
        self.stats_window = window  # rows of the newest `window` queries, never consumed: a sliding window
        self.rows_chunk = rows_chunk  # a long prefill call reaches the rows in chunks of this many queries

    def protected(self, view: LayerView) -> int:
        return min(self.window, view.budget)

    def score(self, view: LayerView) -> torch.Tensor:
        window = self.protected(view)
        scores = window_attention(view, self.window)
        valid = view.meta.valid
        scores = torch.where(newest_valid(view, window), 0.0, scores)  # the window's keys are not pooled
        scores = pool_tokens(scores, self.kernel_size, self.pooling, valid)
        if self.average_heads:
            scores = average_heads(scores, valid)
        return scores

    def protect(self, view: LayerView) -> torch.Tensor:
        return newest_valid(view, self.protected(view))

    def __repr__(self) -> str:
        return (f"SnapKVEvictor(window={self.window}, kernel_size={self.kernel_size}, pooling={self.pooling!r}, "
                f"average_heads={self.average_heads})")
