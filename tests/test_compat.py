"""The cache keyword (transformers 5.24 renamed ``past_key_values`` to ``cache``): tokenmem.cache_kwargs picks the
one the installed transformers takes, a TokenMemory works passed either way, and the suite fails on our own use of
the deprecated name. Runs on the newest transformers (.venv) and on the oldest supported one (scripts/test.sh)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from packaging.version import Version

import tokenmem
from conftest import tiny_model
from tokenmem.adapters.base import Prompt, prefill

RENAMED = Version(transformers.__version__).release >= (5, 24)  # the release that introduced `cache=`
OLD, NEW = "past_key_values", "cache"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_keyword_is_the_one_the_installed_transformers_takes(family):
    model = tiny_model(family)
    expected = NEW if RENAMED else OLD
    assert tokenmem.cache_keyword(model) == expected
    assert tokenmem.cache_keyword() == expected
    assert expected in inspect.signature(type(model).forward).parameters
    memory = tokenmem.TokenMemory(model, "sink", budget=8)
    assert tokenmem.cache_kwargs(model, memory) == {expected: memory}


def _decode(model, keyword, budget=12, steps=6):
    """Prefill 40 tokens, then greedy steps, with a fresh sink memory passed as ``keyword=``; (tokens, memory)."""
    memory = tokenmem.TokenMemory(model, "sink", budget=budget, interval=4)
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    tokens = []
    with torch.no_grad():
        out = model(ids, **{keyword: memory}, use_cache=True)
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), **{keyword: memory}, use_cache=True)
    return tokens, memory


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_memory_works_passed_either_way(family):
    model = tiny_model(family)
    ours, memory = _decode(model, tokenmem.cache_keyword(model))
    assert memory.stats()["seen"] == 46 and memory.stats()["evictions"] > 0  # the model used the memory
    other = OLD if tokenmem.cache_keyword(model) == NEW else NEW
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs, memory = _decode(model, other)
    assert memory.stats()["seen"] == 46 and theirs == ours
    deprecated = [w for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]
    assert bool(deprecated) == (other == OLD)  # transformers >= 5.24 warns about the old name, and only then
    # the same through generate
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(4))
    runs = []
    for keyword in (NEW, OLD):
        memory = tokenmem.TokenMemory(model, "sink", budget=12, interval=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            runs.append(model.generate(ids, **{keyword: memory}, max_new_tokens=8, do_sample=False))
        assert memory.stats()["seen"] == 37 and memory.stats()["evictions"] > 0
    assert torch.equal(runs[0], runs[1])


def test_a_cache_that_the_model_would_ignore_is_an_error():
    """Before 5.24 an inner module of a prepared model ignores ``cache=``: the tokenmem attention refuses it."""
    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, "sink", budget=8)
    ids = torch.randint(3, 300, (1, 10))
    if RENAMED:
        model.model(ids, cache=memory, use_cache=True)
        assert memory.stats()["seen"] == 10
    else:
        with pytest.raises(tokenmem.TokenmemError, match="takes `past_key_values=`"):
            model.model(ids, cache=memory, use_cache=True)


@pytest.mark.skipif(not RENAMED, reason="transformers before 5.24 has no `cache=` and no deprecation warning")
def test_the_suite_fails_when_our_code_passes_the_old_keyword(monkeypatch):
    """pyproject's filterwarnings turns transformers' deprecation of `past_key_values` into an error: were the
    adapters' prefill to pass the old name again, this call would raise instead of warn."""
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (1, 20))
    prompt = Prompt(input_ids=ids, attention_mask=torch.ones_like(ids))
    prefill(model, tokenmem.TokenMemory(model, "sink", budget=8), prompt, 8)  # as shipped: no warning
    monkeypatch.setattr(tokenmem.compat, "cache_keyword", lambda model=None: OLD)
    with pytest.raises(FutureWarning, match="past_key_values"):
        prefill(model, tokenmem.TokenMemory(model, "sink", budget=8), prompt, 8)
