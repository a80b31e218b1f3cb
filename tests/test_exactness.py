"""With a budget that never binds, tokenmem reproduces plain transformers (sdpa + DynamicCache) exactly."""

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import padded_batch, tiny_model, twin

NEW_TOKENS = 64
PROMPT = 24


def _generate(model, ids, mask, cache=None):
    kwargs = {} if cache is None else cache_kwargs(model, cache)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **kwargs)


def _assert_same(ref, out, atol=1e-5):
    assert torch.equal(ref.sequences, out.sequences)
    assert len(ref.logits) == len(out.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(ref.logits, out.logits)):
        err = (a - b).abs().max().item()
        assert err <= atol, f"step {step}: logits differ by {err}"


@pytest.fixture(scope="module")
def references():
    """Plain transformers generations, computed once per (family, batch)."""
    cache = {}

    def get(family, batch):
        if (family, batch) not in cache:
            model = tiny_model(family)
            ids, mask = padded_batch(batch, PROMPT, seed=batch)
            cache[(family, batch)] = (model, ids, mask, _generate(model, ids, mask))
        return cache[(family, batch)]

    return get


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("evictor", ["full", "sink", "recent", "h2o", "random", "separator"])
def test_no_eviction_matches_dynamic_cache(family, batch, evictor, references):
    model, ids, mask, ref = references(family, batch)
    ours = twin(model)
    budget = None if evictor == "full" else PROMPT + NEW_TOKENS
    options = {"separator_ids": [5, 6, 7]} if evictor == "separator" else {}
    memory = tokenmem.TokenMemory(ours, evictor=evictor, budget=budget, interval=8, **options)
    out = _generate(ours, ids, mask, memory)
    _assert_same(ref, out)
    assert memory.stats()["evictions"] == 0
    stats = memory.stats()
    assert stats["held_slots"] == [PROMPT + NEW_TOKENS - 1] * len(memory.layers)
    real = (mask.sum(1) + NEW_TOKENS - 1).tolist()  # each row's tokens, its left padding not held
    assert stats["held_per_head"] == [[[n] * len(row) for n, row in zip(real, layer)] for layer in stats["held_per_head"]]
    assert stats["held"] == [sum(real) / len(real)] * len(memory.layers)


def test_prepared_model_still_matches_with_dynamic_cache(references):
    """Once prepared, the model's attention is 'tokenmem' even with a DynamicCache; results are unchanged."""
    model, ids, mask, ref = references("llama", 2)
    ours = twin(model)
    tokenmem.prepare_model(ours)
    assert ours.config._attn_implementation == "tokenmem"
    _assert_same(ref, _generate(ours, ids, mask))
    tokenmem.restore_model(ours)
    assert ours.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("batch", [1, 2])
def test_shift_positions_without_eviction(batch, references):
    """In shift mode positions are cache slots: identical without padding, the same up to a constant
    per-row position offset with left padding (RoPE is relative, so logits agree to float precision)."""
    model, ids, mask, ref = references("llama", batch)
    ours = twin(model)
    memory = tokenmem.TokenMemory(ours, "sink", budget=PROMPT + NEW_TOKENS, positions="shift")
    out = _generate(ours, ids, mask, memory)
    _assert_same(ref, out, atol=1e-5 if batch == 1 else 1e-4)


def test_hand_written_loop_matches(references):
    """The memory as the cache of a manual decode loop, batch 1."""
    model, ids, mask, ref = references("qwen2", 1)
    ours = twin(model)
    memory = tokenmem.TokenMemory(ours, "h2o", budget=1000, interval=4)
    tokens = []
    with torch.no_grad():
        out = ours(ids, **cache_kwargs(ours, memory), use_cache=True)
        for _ in range(NEW_TOKENS):
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            out = ours(nxt, **cache_kwargs(ours, memory), use_cache=True)
    assert torch.equal(torch.cat(tokens, 1), ref.sequences[:, PROMPT:])


@pytest.mark.parametrize("evictor", ["full", "h2o", "namm"])
def test_beam_search_matches_dynamic_cache(evictor, references):
    """num_beams > 1 reorders the cache every step (keys, values, metadata, state, attention rows)."""
    from tokenmem.plugins.namm import NAMM

    model, ids, mask, _ = references("llama", 2)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False)
        ours = twin(model)
        ev = NAMM(interval=16) if evictor == "namm" else evictor
        memory = tokenmem.TokenMemory(ours, ev, budget=None if evictor != "h2o" else 1000)
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False,
                            **cache_kwargs(ours, memory))
    assert torch.equal(ref, out)


def test_reorder_moves_every_per_sequence_buffer():
    from tokenmem.plugins.namm import NAMM

    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, NAMM(interval=64))
    ids = torch.randint(3, 300, (2, 21), generator=torch.Generator().manual_seed(0))  # 21 % 16: rows pending
    with torch.no_grad():
        model(ids, **cache_kwargs(model, memory), use_cache=True)
    layer = memory.layers[0]
    assert layer.row_count == 5
    before = {name: t.clone() for name, t in (("k", layer._k), ("meta", layer._meta), ("rows", layer.rows),
                                              ("ema", layer.state["namm_ema"]))}
    memory.reorder_cache(torch.tensor([1, 0]))
    for name, t in (("k", layer._k), ("meta", layer._meta), ("rows", layer.rows), ("ema", layer.state["namm_ema"])):
        assert torch.equal(t[0], before[name][1]) and torch.equal(t[1], before[name][0]), name
    memory.batch_repeat_interleave(2)
    assert layer.rows.shape[0] == layer._k.shape[0] == 4
    with torch.no_grad():
        model(torch.randint(3, 300, (4, 1)), **cache_kwargs(model, memory), use_cache=True)  # still consistent
