"""MemoryConfig (the validated settings of a TokenMemory) and what an evictor declares it needs."""

from __future__ import annotations

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import VOCAB, tiny_model


def _run(model, memory, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (1, 48), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = [model(input_ids=ids[:, s : s + 16], **cache_kwargs(model, memory), use_cache=True).logits for s in (0, 16, 32)]
    return torch.cat(out, dim=1)


def test_a_config_makes_the_memory_the_keywords_make():
    model = tiny_model("llama")
    config = tokenmem.MemoryConfig("h2o", budget=20, interval=4, evictor_options={"recent": 0.25})
    by_config = tokenmem.TokenMemory(model, config=config)
    by_keywords = tokenmem.TokenMemory(model, "h2o", budget=20, interval=4, recent=0.25)
    assert torch.equal(_run(model, by_config), _run(model, by_keywords))
    assert (by_config.budget, by_config.interval, by_config.evictor.recent) == (20, 4, 0.25)
    assert by_config.stats()["evictions"] > 0


def test_one_config_makes_independent_memories():
    """A named evictor is built per memory: two random-evictor memories from one config draw the same tokens."""
    model = tiny_model("llama")
    config = tokenmem.MemoryConfig("random", budget=12, interval=4)
    first, second = tokenmem.TokenMemory(model, config=config), tokenmem.TokenMemory(model, config=config)
    assert first.evictor is not second.evictor
    assert torch.equal(_run(model, first), _run(model, second))


@pytest.mark.parametrize("settings,error,match", [
    (dict(budget=0), tokenmem.BudgetError, "positive number of tokens"),
    (dict(budget=1.5), tokenmem.BudgetError, "fraction of the tokens seen"),
    (dict(interval=0), tokenmem.TokenmemError, "interval must be a positive int"),
    (dict(positions="slots"), tokenmem.TokenmemError, "positions must be one of"),
    (dict(evict_unit="frame"), tokenmem.TokenmemError, "evict_unit must be one of"),
    (dict(evictor="nope"), tokenmem.UnknownEvictorError, "unknown evictor 'nope'"),
    (dict(separator_ids=["a"]), tokenmem.TokenmemError, "separator_ids must be token ids"),
])
def test_config_is_validated_when_made(settings, error, match):
    with pytest.raises(error, match=match):
        tokenmem.MemoryConfig(**settings)


def test_config_and_keywords_together_are_refused():
    config = tokenmem.MemoryConfig("sink", budget=16)
    with pytest.raises(tokenmem.TokenmemError, match="either as config"):
        tokenmem.TokenMemory(None, "sink", budget=16, config=config)
    with pytest.raises(tokenmem.BudgetError, match="needs a budget"):
        tokenmem.TokenMemory(None, config=tokenmem.MemoryConfig("sink"))


class Punctuation(tokenmem.Evictor):
    """Not called "separator": it declares that it reads the separator flag, and a decode interval of 3."""

    name = "punctuation"
    needs_separators = True
    default_interval = 3

    def score(self, view):
        return view.meta.is_separator.float() + view.meta.position.float() / 1e6

    def protect(self, view):
        return view.newest(2)


def test_the_memory_reads_what_the_evictor_declares_not_its_name():
    model = tiny_model("llama")
    with pytest.raises(tokenmem.TokenmemError, match="punctuation evictor needs to know the separator tokens"):
        tokenmem.TokenMemory(model, Punctuation(), budget=16)
    memory = tokenmem.TokenMemory(model, Punctuation(), budget=16, separator_ids=list(range(3, 100)))
    assert memory.interval == 3
    _run(model, memory)
    meta = memory.layers[0].meta
    assert bool(meta.is_separator.any())
    assert torch.equal(meta.is_separator, (meta.token >= 3) & (meta.token < 100))


def test_layer_view_extras_is_kept_empty_for_old_evictors():
    seen = []

    class Reader(tokenmem.Evictor):
        name = "reader"

        def score(self, view):
            seen.append(view.extras)
            return view.meta.position.float()

    model = tiny_model("llama")
    _run(model, tokenmem.TokenMemory(model, Reader(), budget=12))
    assert seen and all(extras == {} for extras in seen)
