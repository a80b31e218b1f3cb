"""Bad input gets a tokenmem error that names the problem and the fix, before any work is lost."""

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("budget", [0, -5, 0.0, -0.5, 1.5, float("nan"), "256", True])
def test_bad_budget(model, budget):
    with pytest.raises(tokenmem.BudgetError, match="budget"):
        tokenmem.TokenMemory(model, "sink", budget=budget)


def test_evicting_without_budget(model):
    with pytest.raises(tokenmem.BudgetError, match="needs a budget"):
        tokenmem.TokenMemory(model, "h2o")


def test_budget_smaller_than_protected_tokens_at_construction(model):
    with pytest.raises(tokenmem.BudgetError, match="sink tokens"):
        tokenmem.TokenMemory(model, "sink", budget=4)
    with pytest.raises(tokenmem.BudgetError, match="initial"):
        tokenmem.TokenMemory(model, "separator", budget=3, separator_ids=[5])


def test_budget_smaller_than_protected_tokens_at_eviction(model):
    """An int budget below what the evictor protects at eviction time is an error (the cache is left intact); a
    fraction of a short stream never goes below the protected tokens (a stream starts small: a DT's first step)."""
    from tokenmem.meta import PROTECT, TokenMeta

    memory = tokenmem.TokenMemory(model, "recent", budget=8, interval=1)
    flags = torch.zeros(1, 20, dtype=torch.long)
    flags[:, :12] = PROTECT  # an adapter protects 12 tokens (a long question), more than the budget
    memory.annotate(TokenMeta.build(1, 20, flags=flags))
    with torch.no_grad(), pytest.raises(tokenmem.BudgetError, match="smaller than the 12 tokens"):
        model(torch.randint(3, 300, (1, 20)), **cache_kwargs(model, memory), use_cache=True)
    assert memory.layers[0].held == 20
    fraction = tokenmem.TokenMemory(model, "sink", budget=0.02, interval=1)
    with torch.no_grad():
        model(torch.randint(3, 300, (1, 100)), **cache_kwargs(model, fraction), use_cache=True)
    assert all(layer.held == 4 for layer in fraction.layers)  # 2% of 100 is 2: the 4 sink tokens stay


def test_unknown_evictor_lists_known_ones(model):
    with pytest.raises(tokenmem.UnknownEvictorError) as info:
        tokenmem.TokenMemory(model, "lru", budget=10)
    for name in ("sink", "h2o", "separator", "recent", "full", "random"):
        assert name in str(info.value)


def test_model_whose_attention_cannot_be_registered():
    """GPT-Neo computes attention in its own code, outside transformers' AttentionInterface."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                       attention_types=[[["global", "local"], 1]], max_position_embeddings=128)
    neo = GPTNeoForCausalLM(cfg)
    with pytest.raises(tokenmem.UnsupportedModelError, match="AttentionInterface"):
        tokenmem.TokenMemory(neo, "sink", budget=32)


def test_not_a_transformers_model():
    with pytest.raises(tokenmem.UnsupportedModelError, match="PreTrainedModel"):
        tokenmem.TokenMemory(torch.nn.Linear(2, 2), "full")


def test_reuse_for_another_batch_size(model):
    memory = tokenmem.TokenMemory(model, "sink", budget=32)
    with torch.no_grad():
        model(torch.randint(3, 300, (2, 10)), **cache_kwargs(model, memory), use_cache=True)
        with pytest.raises(tokenmem.MemoryStateError, match="new TokenMemory"):
            model(torch.randint(3, 300, (3, 10)), **cache_kwargs(model, memory), use_cache=True)
    memory.reset()
    with torch.no_grad():
        model(torch.randint(3, 300, (3, 10)), **cache_kwargs(model, memory), use_cache=True)
    assert memory.seen == 10


def test_attention_switched_away_is_detected(model):
    from conftest import twin

    m = twin(model)
    memory = tokenmem.TokenMemory(m, "sink", budget=32)
    m.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(tokenmem.TokenmemError, match="not 'tokenmem'"):
        m(torch.randint(3, 300, (1, 10)), **cache_kwargs(m, memory), use_cache=True)


@pytest.mark.parametrize("kwargs,match", [
    ({"interval": 0}, "interval"),
    ({"positions": "absolute"}, "positions"),
    ({"evictor": 3}, "evictor"),
])
def test_other_bad_arguments(model, kwargs, match):
    args = {"evictor": "sink", "budget": 32, **kwargs}
    with pytest.raises(tokenmem.TokenmemError, match=match):
        tokenmem.TokenMemory(model, **args)


def test_separator_evictor_without_separators():
    from transformers import LlamaForCausalLM

    m = tiny_model("llama")
    assert isinstance(m, LlamaForCausalLM)
    with pytest.raises(tokenmem.TokenmemError, match="separator tokens"):
        tokenmem.TokenMemory(m, "separator", budget=64)
