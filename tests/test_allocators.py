"""The budget allocators spend the memory's budget as the mean (issue #17): ``pyramid`` (PyramidKV, Cai et al. 2024,
arXiv:2406.02069) holds ``layers x B`` tokens per KV head with shallow layers above ``B`` and deep ones below,
``ada`` (AdaKV, Feng et al. 2024, arXiv:2407.11550) holds ``heads x B`` per layer and batch row with heads above
and below ``B``, at ``TokenMemory(budget=B)``. Checked after a one-shot prefill, while streaming in chunks, in a
left-padded batch, while decoding (within the interval's slack) and with a fractional budget; every other
evictor's :meth:`~tokenmem.Evictor.layer_budget` is the memory's budget.
"""

from __future__ import annotations

import pytest
import torch

import tokenmem
from tokenmem.compat import cache_kwargs
from conftest import padded_batch, tiny_model
from tokenmem.occupancy import held_tokens
from tokenmem.scoring import pyramid_budgets

LAYERS, BETA, B = 4, 4, 20
SHARES = pyramid_budgets(B, LAYERS, BETA)  # [35, 25, 15, 5]


def _model():
    return tiny_model("llama", num_hidden_layers=LAYERS)  # 2 KV heads


def _feed(model, memory, ids, chunk=None, mask=None, check=None):
    """Prefill ``ids`` in chunks of ``chunk`` tokens (all at once by default), calling ``check()`` after each."""
    step = chunk or ids.shape[1]
    with torch.no_grad():
        for s in range(0, ids.shape[1], step):
            part = None if mask is None else mask[:, : s + step]
            out = model(ids[:, s : s + step], attention_mask=part, **cache_kwargs(model, memory), use_cache=True)
            if check is not None:
                check()
    return out


def _decode(model, memory, out, steps, mask=None, check=None):
    with torch.no_grad():
        for _ in range(steps):
            tok = out.logits[:, -1:].argmax(-1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(tok)], 1)
            out = model(tok, attention_mask=mask, **cache_kwargs(model, memory), use_cache=True)
            if check is not None:
                check()
    return out


def test_the_default_layer_budget_is_the_memory_budget():
    """Every evictor but the allocators: (budget, budget) for every layer, so the default path is unchanged."""
    model = _model()
    for name in tokenmem.list_evictors():
        if name in ("pyramid", "ada", "full"):
            continue
        options = {"separator_ids": [5]} if name == "separator" else {}
        memory = tokenmem.TokenMemory(model, name, budget=16, **options)
        _feed(model, memory, torch.randint(3, 300, (1, 8)))
        assert [memory.layer_budget(layer) for layer in memory.layers] == [(16, 16)] * LAYERS, name
    memory = tokenmem.TokenMemory(model, "full")
    assert memory.layer_budget(memory.layers[0]) == (None, None)


# ---------------------------------------------------------------------------------------------
# pyramid
# ---------------------------------------------------------------------------------------------
def test_pyramid_at_budget_b_holds_layers_times_b_deeper_layers_fewer():
    model = _model()
    memory = tokenmem.TokenMemory(model, "pyramid", budget=B, beta=BETA, window=4, interval=64)
    _feed(model, memory, torch.randint(3, 300, (1, 90), generator=torch.Generator().manual_seed(5)))
    stats = memory.stats()
    assert stats["held"] == SHARES == [35, 25, 15, 5]  # not uniform snapkv: [20, 20, 20, 20]
    assert sum(stats["held"]) == LAYERS * B
    assert stats["held_slots"] == SHARES  # every head of a layer keeps the same count: nothing masked
    assert stats["held_per_head"] == [[[s, s]] for s in SHARES]
    # (spend, cap): each layer evicts above its share; a small share may hold protected tokens up to the budget
    assert [memory.layer_budget(layer) for layer in memory.layers] == [(35, 35), (25, 25), (15, 20), (5, 20)]
    # the same KV bytes as uniform snapkv at the same budget
    uniform = tokenmem.TokenMemory(model, "snapkv", budget=B, window=4)
    _feed(model, uniform, torch.randint(3, 300, (1, 90), generator=torch.Generator().manual_seed(5)))
    assert uniform.stats()["held"] == [B] * LAYERS and uniform.stats()["kv_bytes"] == stats["kv_bytes"]


def test_pyramid_streams_in_chunks_and_decodes_within_each_layer_share():
    model = _model()
    interval = 8
    memory = tokenmem.TokenMemory(model, "pyramid", budget=B, beta=BETA, window=4, interval=interval)
    ids = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(6))

    def within(extra):
        def check():
            counts = held_tokens(memory)
            for share, c in zip(SHARES, counts):
                assert int(c.max()) <= share + extra, f"{[x.tolist() for x in counts]} vs {SHARES} + {extra}"
            assert sum(memory.stats()["held"]) <= LAYERS * (B + extra)
        return check

    out = _feed(model, memory, ids, chunk=16, check=within(0))  # every chunk ends with an eviction
    assert memory.stats()["held"] == SHARES
    _decode(model, memory, out, 3 * interval, check=within(interval - 1))
    assert [layer.evictions for layer in memory.layers] == [8 + 3] * LAYERS  # 8 chunks, then every 8 steps
    assert memory.stats()["held"] == SHARES  # the 24th step evicted


def test_pyramid_with_a_fractional_budget_spends_the_fraction_of_the_tokens_seen():
    model = _model()
    memory = tokenmem.TokenMemory(model, "pyramid", budget=0.25, beta=BETA, window=4, interval=64)
    _feed(model, memory, torch.randint(3, 300, (1, 80)), chunk=20)
    assert memory.budget_tokens() == 20
    assert memory.stats()["held"] == SHARES and sum(memory.stats()["held"]) == LAYERS * 20


def test_pyramid_in_a_left_padded_batch_holds_each_layer_share_per_row():
    model = _model()
    ids, mask = padded_batch(2, 60, seed=2, pad=9)
    memory = tokenmem.TokenMemory(model, "pyramid", budget=B, beta=BETA, window=4, interval=4)
    out = _feed(model, memory, ids, mask=mask)
    stats = memory.stats()
    assert stats["held_per_head"] == [[[s, s], [s, s]] for s in SHARES]
    _decode(model, memory, out, 6, mask=mask)
    for share, counts in zip(SHARES, held_tokens(memory)):
        assert int(counts.max()) <= share + 3


# ---------------------------------------------------------------------------------------------
# ada
# ---------------------------------------------------------------------------------------------
def _ada_layers(memory, budget, extra=0, exact=False):
    """Each layer and row holds ``heads x budget`` (at most ``+ heads x extra``) valid tokens; some heads differ."""
    ragged = False
    for i, counts in enumerate(held_tokens(memory)):
        heads = counts.shape[1]
        totals = counts.sum(1)
        if exact:
            assert totals.tolist() == [heads * budget] * counts.shape[0], f"layer {i}: {counts.tolist()}"
        assert int(totals.max()) <= heads * (budget + extra), f"layer {i}: {counts.tolist()}"
        ragged |= bool((counts != counts[:, :1]).any())
    return ragged


def test_ada_at_budget_b_shares_heads_times_b_per_layer_unevenly():
    model = _model()
    memory = tokenmem.TokenMemory(model, "ada", budget=B, window=4, interval=64)
    _feed(model, memory, torch.randint(3, 300, (1, 80), generator=torch.Generator().manual_seed(6)))
    assert _ada_layers(memory, B, exact=True), "every head kept the same count: uniform snapkv"
    assert [memory.layer_budget(layer) for layer in memory.layers] == [(B, 2 * B)] * LAYERS
    stats = memory.stats()
    assert stats["held"] == [B] * LAYERS  # each layer's mean over heads: the budget
    for i, layer in enumerate(memory.layers):
        counts = stats["held_per_head"][i][0]
        assert sum(counts) == 2 * B and min(counts) >= 4  # the safeguard (alpha 0.2 of 20) and the window
        assert stats["held_slots"][i] == layer.held == max(counts)
    assert any(max(row[0]) > B for row in stats["held_per_head"])  # a head above the budget: no cap at B


def test_ada_streams_in_chunks_and_decodes_within_the_layer_budget():
    model = _model()
    interval = 8
    memory = tokenmem.TokenMemory(model, "ada", budget=B, window=4, interval=interval)
    ids = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(7))
    raggedness = []
    out = _feed(model, memory, ids, chunk=16,
                check=lambda: raggedness.append(_ada_layers(memory, B, exact=memory.seen >= B)))
    assert any(raggedness)
    _decode(model, memory, out, 3 * interval, check=lambda: _ada_layers(memory, B, extra=interval - 1))
    assert memory.layers[0].evictions >= 120 // 16 + 3 - 1


def test_ada_in_a_left_padded_batch_and_with_a_fractional_budget():
    model = _model()
    ids, mask = padded_batch(2, 60, seed=3, pad=9)
    memory = tokenmem.TokenMemory(model, "ada", budget=16, window=4, interval=4)
    out = _feed(model, memory, ids, mask=mask)
    assert _ada_layers(memory, 16, exact=True)
    stats = memory.stats()
    assert stats["held"] == [16] * LAYERS and all(len(layer) == 2 for layer in stats["held_per_head"])
    _decode(model, memory, out, 6, mask=mask, check=lambda: _ada_layers(memory, 16, extra=3))


def test_ada_with_a_fractional_budget_spends_the_fraction_per_layer():
    model = _model()
    memory = tokenmem.TokenMemory(model, "ada", budget=0.25, window=4, interval=64)
    _feed(model, memory, torch.randint(3, 300, (1, 80), generator=torch.Generator().manual_seed(8)), chunk=20)
    assert memory.budget_tokens() == 20
    assert _ada_layers(memory, 20, exact=True)
    assert memory.stats()["held"] == [20] * LAYERS


def test_an_evictor_returning_a_bad_layer_budget_is_reported():
    class Bad(tokenmem.Evictor):
        name = "bad"

        def score(self, view):
            return torch.zeros(1)

        def layer_budget(self, budget, layer, memory):
            return 0, budget

    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, Bad(), budget=4)
    with pytest.raises(tokenmem.TokenmemError, match="layer_budget.*two token counts >= 1.*spend=0"):
        _feed(model, memory, torch.randint(3, 300, (1, 8)))


def test_pyramid_keeps_protected_tokens_beyond_a_small_layer_share_up_to_the_budget():
    """A protected span (a question) longer than the deep layers' shares (15, 5): kept there whole with SnapKV's
    window, as a uniform evictor at the same budget keeps them, instead of a BudgetError; the shallow layers keep
    their shares."""
    from tokenmem.meta import PROTECT, TokenMeta

    model = _model()
    memory = tokenmem.TokenMemory(model, "pyramid", budget=B, beta=BETA, window=4, interval=64)
    flags = torch.zeros(60, dtype=torch.long)
    flags[10:22] = PROTECT  # 12 protected tokens, early in the prompt
    memory.annotate(TokenMeta.build(1, 60, flags=flags))
    _feed(model, memory, torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(9)))
    protected = 12 + 4  # the span and SnapKV's window (4 newest tokens)
    assert memory.stats()["held"] == [max(share, protected) for share in SHARES] == [35, 25, 16, 16]
    for layer in memory.layers:
        kept = layer.meta.position[0, 0].tolist()
        assert set(range(10, 22)) <= set(kept)


def test_pyramid_reports_protected_tokens_beyond_what_a_layer_may_keep():
    from tokenmem.meta import PROTECT, TokenMeta

    model = _model()
    memory = tokenmem.TokenMemory(model, "pyramid", budget=B, beta=BETA, window=4, interval=64)
    flags = torch.zeros(60, dtype=torch.long)
    flags[10:40] = PROTECT  # 30 protected tokens + the window: more than layer 1 may keep (25)
    memory.annotate(TokenMeta.build(1, 60, flags=flags))
    with pytest.raises(tokenmem.BudgetError, match=r"budget of 25 tokens is smaller than the 34 tokens evictor "
                       r"'pyramid' \(which lets this layer keep 25 tokens per head of the memory's budget of 20\)"):
        _feed(model, memory, torch.randint(3, 300, (1, 60)))
