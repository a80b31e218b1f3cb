"""Short calls that count as decode steps (``decode_span``): a Decision Transformer step appends 3 tokens."""

from __future__ import annotations

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import tiny_model
from tokenmem.errors import TokenmemError


def _feed(memory, model, calls, width):
    ids = torch.randint(3, 300, (1, calls * width), generator=torch.Generator().manual_seed(0))
    held = []
    with torch.no_grad():
        for s in range(0, ids.shape[1], width):
            model(input_ids=ids[:, s : s + width], **cache_kwargs(model, memory), use_cache=True)
            held.append(max(memory.stats()["held"]))
    return held


@pytest.mark.parametrize("evictor", ["recent", "h2o", "sink"])
def test_three_token_calls_evict_every_interval_and_keep_the_bound(evictor):
    model = tiny_model("gpt2")
    budget, interval = 20, 16
    every_call = tokenmem.TokenMemory(model, evictor, budget=budget, interval=interval)
    held_default = _feed(every_call, model, 40, 3)
    span = tokenmem.TokenMemory(model, evictor, budget=budget, interval=interval, decode_span=3)
    held_span = _feed(span, model, 40, 3)
    assert max(held_default) <= budget  # default: every 3-token call ends with an eviction
    assert every_call.stats()["evictions"] > 3 * span.stats()["evictions"] > 0
    assert max(held_span) <= budget + interval - 1  # the decode bound holds between calls
    assert max(held_span) > budget  # tokens accumulate up to an interval's worth
    assert span.stats()["seen"] == every_call.stats()["seen"] == 120


def test_longer_calls_still_evict_at_once_and_bad_values_are_refused():
    model = tiny_model("gpt2")
    memory = tokenmem.TokenMemory(model, "recent", budget=20, interval=64, decode_span=3)
    assert max(_feed(memory, model, 5, 8)) <= 20  # 8-token calls are prefill chunks: evict when over budget
    for bad in (0, -1, 1.5, True):
        with pytest.raises(TokenmemError, match="decode_span"):
            tokenmem.TokenMemory(model, "recent", budget=20, decode_span=bad)
