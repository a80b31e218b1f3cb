"""The evictor zoo (issue #17): snapkv, tova, keydiff, knorm, expected_attention, pyramid, ada, infinipot_v.

Every evictor through the real memory with the tiny models of conftest: int and float budgets, a left-padded
batch of 2 through ``model.generate``, eviction while decoding, ``evict_unit="segment"``; then each method's own
rule on hand-made inputs (the shared pieces of ``tokenmem.scoring`` against plain-Python references, the
allocators' budgets and honest per-head counts, InfiniPot-V's temporal redundancy). kvpress comparisons are in
``tests/test_peers_kvpress.py``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import padded_batch, tiny_model, twin
from tokenmem.attention import tokenmem_attention
from tokenmem.meta import MODALITIES, TokenMeta
from tokenmem.occupancy import held_tokens, occupancy
from tokenmem.rope import rotate_by
from tokenmem.scoring import keep_counts, pool_tokens, pyramid_budgets, share_across_heads

ZOO = {  # name -> options small enough for tiny prompts
    "snapkv": dict(window=8),
    "tova": dict(),
    "keydiff": dict(),
    "knorm": dict(),
    "expected_attention": dict(window=16),
    "pyramid": dict(window=8, beta=2),  # the memory's budget is the mean: layers share layers x budget
    "ada": dict(window=8),  # the memory's budget is the mean: each layer's heads share heads x budget
    "infinipot_v": dict(),
}
ALLOCATORS = ("pyramid", "ada")


def _check_within(memory, name, budget, extra=0):
    """Every layer and head holds at most ``budget + extra`` valid tokens. The allocators spend the same total
    differently: ``pyramid`` holds each layer at most at its share of ``layers x budget`` (+ ``extra``), ``ada``
    each layer's batch row at most ``heads x (budget + extra)`` over its heads."""
    stats = memory.stats()
    assert stats["held_per_head"] == [c.tolist() for c in held_tokens(memory)]
    shares = pyramid_budgets(budget, len(memory.layers), ZOO["pyramid"]["beta"])
    for layer, counts in zip(memory.layers, held_tokens(memory)):
        where = f"{name} layer {layer.index}: {counts.tolist()}"
        if name == "pyramid":
            assert int(counts.max()) <= shares[layer.index] + extra, f"{where} > {shares[layer.index]}+{extra}"
        elif name == "ada":
            heads = counts.shape[1]
            assert int(counts.sum(1).max()) <= heads * (budget + extra), f"{where}: > {heads} x ({budget}+{extra})"
        else:
            assert int(counts.max()) <= budget + extra, f"{where} > {budget}+{extra}"
            assert layer.held <= budget + extra
    if name in ALLOCATORS:  # the same total as a uniform evictor at this budget
        assert sum(stats["held"]) <= len(memory.layers) * (budget + extra)


# ---------------------------------------------------------------------------------------------
# Every evictor through the memory
# ---------------------------------------------------------------------------------------------
def test_the_zoo_is_registered():
    names = tokenmem.list_evictors()
    for name in ZOO:
        assert name in names and names[name], name


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("budget", [20, 0.4])
def test_budget_int_and_float_after_prefill_and_decode(name, budget):
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(1))
    interval = 4
    memory = tokenmem.TokenMemory(model, name, budget=budget, interval=interval, **ZOO[name])
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, memory))
        cap = memory.budget_tokens()
        assert cap == (20 if budget == 20 else math.ceil(0.4 * 60))
        _check_within(memory, name, cap)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(10):
            out = model(tok, **cache_kwargs(model, memory))
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            _check_within(memory, name, memory.budget_tokens(), extra=interval)
    assert memory.layers[0].evictions >= 3  # the prefill's and at least two while decoding
    assert memory.seen == 70


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_left_padded_batch_of_two_generates_like_its_rows(name, family):
    """A left-padded batch of 2 through ``model.generate``: each row generates what it generates alone."""
    model = tiny_model(family)
    ids, mask = padded_batch(2, 40, seed=3, pad=7)
    options = dict(budget=16, interval=4, **ZOO[name])
    memory = tokenmem.TokenMemory(model, name, **options)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, memory), max_new_tokens=12, do_sample=False)
    assert memory.layers[0].evictions >= 2
    _check_within(memory, name, 16, extra=4)
    for row in range(2):
        alone = twin(model)
        keep = mask[row].bool()
        single = tokenmem.TokenMemory(alone, name, **options)
        ref = alone.generate(ids[row : row + 1, keep], **cache_kwargs(alone, single), max_new_tokens=12, do_sample=False)
        assert out[row, -12:].tolist() == ref[0, -12:].tolist(), f"{name} row {row}"


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize(("family", "positions"), [("gpt2", "original"), ("mistral", "shift")])
def test_without_rope_and_in_shift_mode(name, family, positions):
    """GPT-2 has no rotary embedding (expected_attention and infinipot_v then skip their RoPE steps); ``shift``
    re-rotates the kept keys to their slots."""
    model = tiny_model(family)
    memory = tokenmem.TokenMemory(model, name, budget=16, interval=4, positions=positions, **ZOO[name])
    model.generate(torch.randint(3, 300, (1, 40)), **cache_kwargs(model, memory), max_new_tokens=8, do_sample=False)
    assert memory.layers[0].evictions >= 2
    _check_within(memory, name, 16, extra=4)


@pytest.mark.parametrize("name", list(ZOO))
def test_segment_unit_keeps_or_drops_whole_frames(name):
    """``evict_unit="segment"``: frame tokens (segments of 5) stay or go together."""
    model = tiny_model("llama")
    head, frames, per, tail = 4, 10, 5, 3
    q = head + frames * per + tail
    modality = torch.full((q,), MODALITIES["text"])
    segment = torch.full((q,), -1)
    token = torch.full((q,), -1)
    block = slice(head, head + frames * per)
    modality[block] = MODALITIES["frame"]
    segment[block] = torch.arange(frames).repeat_interleave(per)
    token[block] = torch.arange(per).repeat(frames)
    meta = TokenMeta.build(1, q, modality=modality, segment=segment, token=token)
    ids = torch.randint(3, 300, (1, q), generator=torch.Generator().manual_seed(2))
    memory = tokenmem.TokenMemory(model, name, budget=30, interval=64, evict_unit="segment", **ZOO[name])
    memory.annotate(meta)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, memory))
    for layer in memory.layers:
        assert layer.evictions == 1
        m = layer.meta
        for h in range(m.position.shape[1]):
            kept = m.valid[0, h]
            segs = m.segment[0, h][kept & (m.modality[0, h] == MODALITIES["frame"])].tolist()
            assert sum(kept.tolist()) <= memory.layer_budget(layer, 30)[1]  # the cap (allocators: their share)
            for s in set(segs):
                assert segs.count(s) == per, f"{name}: frame {s} split ({segs.count(s)} of {per} kept)"


@pytest.mark.parametrize("name", ["keydiff", "knorm"])
def test_keydiff_and_knorm_need_no_attention_statistics(name, monkeypatch):
    """No mass pass and no rows window: the attention kernel is never asked for statistics."""
    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, name, budget=16, interval=4)
    assert memory.evictor.needs_stats is False and memory.evictor.stats_window == 0
    calls = []
    real = tokenmem.kernels.attention_with_stats

    def spy(*args, **kwargs):
        calls.append((kwargs.get("need_mass"), kwargs.get("rows")))
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenmem.kernels, "attention_with_stats", spy)
    model.generate(torch.randint(3, 300, (1, 40)), **cache_kwargs(model, memory), max_new_tokens=8, do_sample=False)
    assert calls and all(need is False and rows is None for need, rows in calls)
    for layer in memory.layers:
        assert layer.mass is None and layer.rows is None
        assert layer.evictions >= 2


def test_snapkv_keeps_a_sliding_window_of_rows_and_differs_from_recent():
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (1, 80), generator=torch.Generator().manual_seed(4))
    memory = tokenmem.TokenMemory(model, "snapkv", budget=24, window=8)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, memory))
    layer = memory.layers[0]
    assert layer.row_count == 8  # the newest 8 queries' rows, never consumed
    pos = layer.meta.position[0]
    assert set(range(72, 80)) <= set(pos[0].tolist())  # the window is kept
    assert pos[0].tolist() != list(range(56, 80)), "snapkv kept exactly the newest tokens"


def test_tova_heads_share_one_decision():
    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, "tova", budget=20)
    model.generate(torch.randint(3, 300, (1, 50)), **cache_kwargs(model, memory), max_new_tokens=6, do_sample=False)
    for layer in memory.layers:
        pos = layer.meta.position[0]
        assert layer.held == 20  # default interval 1: one token out per generated token, as the paper does
        assert torch.equal(pos[0], pos[1])


# ---------------------------------------------------------------------------------------------
# Shared pieces (tokenmem.scoring) against plain-Python references
# ---------------------------------------------------------------------------------------------
def test_pool_tokens_matches_a_plain_reference():
    x = torch.rand(2, 3, 11)
    for k in (1, 3, 5):
        for mode in ("avg", "max"):
            got = pool_tokens(x, k, mode)
            ref = torch.zeros_like(x)
            for i in range(11):
                window = [x[..., j] if 0 <= j < 11 else torch.zeros(2, 3) for j in range(i - k // 2, i + k // 2 + 1)]
                stack = torch.stack(window, -1)
                ref[..., i] = stack.mean(-1) if mode == "avg" else stack.amax(-1)
            torch.testing.assert_close(got, ref)


def test_keep_counts_per_head_protected_first_newest_on_ties():
    scores = torch.tensor([[[5.0, 1, 1, 3, 0], [0, 0, 0, 0, 0]]])
    protect = torch.tensor([[[False, False, False, False, True], [True, False, False, False, False]]])
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    keep = keep_counts(scores, protect, valid, torch.tensor([[3, 2]]))
    assert keep[0, 0].tolist() == [True, False, False, True, True]
    assert keep[0, 1].tolist() == [True, False, False, False, True]  # ties: the newest


@pytest.mark.parametrize("seed", range(5))
def test_share_across_heads_matches_a_greedy_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, n, total, floor, cap = 2, 3, 9, 12, 2, 6
    scores = torch.rand(b, h, n, generator=g)
    protect = torch.rand(b, h, n, generator=g) < 0.1
    valid = torch.rand(b, h, n, generator=g) < 0.9
    keep = share_across_heads(scores, protect, valid, total, floor=floor, cap=cap)
    for r in range(b):
        chosen = set()
        for y in range(h):  # protected, then each head's best `floor`
            items = sorted((j for j in range(n) if valid[r, y, j]), key=lambda j: (not protect[r, y, j], -scores[r, y, j]))
            chosen |= {(y, j) for j in items[: max(floor, sum(bool(protect[r, y, j] & valid[r, y, j]) for j in range(n)))]}
        rest = sorted(((y, j) for y in range(h) for j in range(n) if valid[r, y, j] and (y, j) not in chosen),
                      key=lambda t: -scores[r, t[0], t[1]])
        for y, j in rest:
            if len(chosen) >= total:
                break
            if sum(1 for yy, _ in chosen if yy == y) < cap:
                chosen.add((y, j))
        got = {(y, j) for y in range(h) for j in range(n) if keep[r, y, j]}
        assert got == chosen


def test_pyramid_budgets_shrink_with_depth_at_the_same_total():
    for average, layers, beta in [(50, 3, 2), (17, 5, 20), (7, 4, 1), (100, 32, 20), (12, 2, 2)]:
        budgets = pyramid_budgets(average, layers, beta)
        assert sum(budgets) == layers * average
        assert all(a >= b for a, b in zip(budgets, budgets[1:]))
        if layers > 1 and beta > 1:
            assert budgets[0] > average > budgets[-1]
    assert pyramid_budgets(50, 3, 2) == [75, 50, 25]
    capped = pyramid_budgets(50, 3, 2, cap=60)  # the surplus of layer 0 goes deeper, the total stays
    assert capped[0] == 60 and sum(capped) == 150 and capped == sorted(capped, reverse=True)
    assert pyramid_budgets(50, 3, 2, cap=40) == [40, 40, 40]  # the cap cannot hold the total


# ---------------------------------------------------------------------------------------------
# The allocators through the memory: budgets, ragged heads, honest counts
# ---------------------------------------------------------------------------------------------
def test_pyramid_layer_budgets_shrink_with_depth_and_sum_to_the_same_total():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 300, (1, 90), generator=torch.Generator().manual_seed(5))
    memory = tokenmem.TokenMemory(model, "pyramid", budget=None, average=20, beta=4, window=4, interval=64)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, memory))
    counts = [int(c.max()) for c in held_tokens(memory)]
    assert counts == pyramid_budgets(20, 4, 4) == [35, 25, 15, 5]
    assert sum(counts) == 4 * 20
    assert all(int(c.min()) == int(c.max()) for c in held_tokens(memory))  # heads of a layer keep the same count
    # an explicit average with the memory's budget as the cap: layers above it are held at it, the surplus goes deeper
    with torch.no_grad():
        capped_model = twin(model)
        capped = tokenmem.TokenMemory(capped_model, "pyramid", budget=30, average=20, beta=4, window=4, interval=64)
        capped_model(ids, **cache_kwargs(capped_model, capped))
    assert [int(c.max()) for c in held_tokens(capped)] == pyramid_budgets(20, 4, 4, cap=30) == [30, 27, 17, 6]


def test_ada_heads_hold_different_counts_reported_honestly():
    """An explicit ``average`` with the memory's budget as the cap (the peers tests' setting)."""
    model = tiny_model("llama")  # 2 KV heads
    ids = torch.randint(3, 300, (1, 80), generator=torch.Generator().manual_seed(6))
    memory = tokenmem.TokenMemory(model, "ada", budget=40, average=20, window=4, interval=64)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, memory))
    report = occupancy(memory)
    stats = memory.stats()
    for i, layer in enumerate(memory.layers):
        counts = held_tokens(memory)[i][0]
        assert int(counts.sum()) == 2 * 20  # the layer's budget, shared
        assert counts[0] != counts[1], f"layer {i}: heads hold the same count {counts.tolist()}"
        assert int(counts.min()) >= 4  # the safeguard (alpha 0.2 of 20) and the window
        assert report["held"][i] == [counts.tolist()]
        assert int(counts.max()) <= 40  # the memory's budget caps every head
        # stats(): held is the valid tokens (their mean over heads), held_slots the largest head's count
        assert stats["held"][i] == 20 and stats["held_per_head"][i] == [counts.tolist()]
        assert stats["held_slots"][i] == layer.held == int(counts.max()) == report["slots"][i] > 20
        assert report["masked"][i] == 2 * layer.held - int(counts.sum()) > 0
    assert stats["kv_bytes"] == report["kv_bytes_valid"] < report["kv_bytes_slots"]
    assert report["bytes"] == stats["bytes"]


def test_ada_with_an_average_equal_to_the_cap_is_uniform():
    """An explicit ``average`` equal to the memory's budget: the budget caps every head, so none can take more."""
    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, "ada", budget=20, average=20, window=4, interval=64)
    with torch.no_grad():
        model(torch.randint(3, 300, (1, 80)), **cache_kwargs(model, memory))
    assert all(c.tolist() == [[20, 20]] for c in held_tokens(memory))


# ---------------------------------------------------------------------------------------------
# Expected Attention: queries recovered from the attention rows
# ---------------------------------------------------------------------------------------------
def test_recover_queries_inverts_attention_rows():
    from tokenmem.plugins.expected_attention import recover_queries

    g = torch.Generator().manual_seed(0)
    b, h, r, n, d = 1, 2, 6, 30, 4
    keys = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    queries = torch.randn(b, h, r, d, generator=g, dtype=torch.float64)
    logits = queries @ keys.transpose(-1, -2)  # [b, h, r, n]
    causal = torch.arange(n)[None, :] <= (n - r + torch.arange(r))[:, None]  # row t sees keys <= n - r + t
    rows = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).float()
    live = torch.ones(b, h, r, dtype=torch.bool)
    got, used = recover_queries(rows, keys.float(), torch.ones(b, h, n, dtype=torch.bool), live)
    assert bool(used.all())
    torch.testing.assert_close(got, queries, rtol=1e-3, atol=1e-3)


def test_expected_attention_keeps_the_sinks_and_is_not_recency():
    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, "expected_attention", budget=24, window=16, n_sink=4)
    with torch.no_grad():
        model(torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(8)), **cache_kwargs(model, memory))
    for layer in memory.layers:
        pos = layer.meta.position[0]
        assert layer.held == 24
        assert all(set(range(4)) <= set(p.tolist()) for p in pos)
        assert any(p.tolist() != list(range(4)) + list(range(40, 60)) for p in pos)


# ---------------------------------------------------------------------------------------------
# InfiniPot-V: a repeated frame goes before a changing one
# ---------------------------------------------------------------------------------------------
def _drive(memory, keys, values, meta):
    """Append ``keys [b, h, q, d]`` with ``meta`` to layer 0 of a hand-driven memory and run its attention."""
    memory.annotate(meta)
    k, _ = memory.update(keys, values, 0)
    b, h, q, d = keys.shape
    query = torch.zeros(b, h, q, d)
    tokenmem_attention(SimpleNamespace(layer_idx=0, is_causal=True), query, k, memory.layers[0].values, None,
                       scaling=1.0)


def _frames_layout(per: int, frames: int, text: int = 2):
    q = text + frames * per
    modality = torch.full((q,), MODALITIES["text"])
    segment = torch.full((q,), -1)
    token = torch.arange(q)
    modality[text:] = MODALITIES["frame"]
    segment[text:] = torch.arange(frames).repeat_interleave(per)
    token[text:] = torch.arange(per).repeat(frames)
    return TokenMeta.build(1, q, modality=modality, segment=segment, token=token)


@pytest.mark.parametrize("unit", ["token", "segment"])
def test_infinipot_v_drops_a_repeated_frame_before_a_changing_one(unit):
    g = torch.Generator().manual_seed(0)
    per, d = 6, 8
    f0 = torch.randn(per, d, generator=g)
    f2 = torch.randn(per, d, generator=g)
    text = torch.randn(2, d, generator=g)
    keys = torch.cat([text, f0, f0.clone(), f2])[None, None]  # frame 1 repeats frame 0 exactly
    values = torch.ones_like(keys)
    values[..., 2 + 2 * per:, :] *= 0.1  # the changing frame has the *smallest* value norms: redundancy wins
    memory = tokenmem.TokenMemory(None, "infinipot_v", budget=2 + 2 * per, interval=64, evict_unit=unit)
    _drive(memory, keys, values, _frames_layout(per, 3))
    meta = memory.layers[0].meta
    kept = meta.segment[0, 0][meta.valid[0, 0]].tolist()
    assert kept.count(1) == 0, f"the repeated frame was kept: {kept}"
    assert kept.count(0) == per and kept.count(2) == per and kept.count(-1) == 2


def test_infinipot_v_compares_keys_unrotated():
    """The same patch at another position is rotated differently: un-rotated with the RoPE frequencies, the
    repeat is found (similarity 1); without un-rotation it would not be."""
    from tokenmem.plugins.infinipot_v import temporal_redundancy

    g = torch.Generator().manual_seed(1)
    per, d = 4, 8
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    content = torch.randn(per, d, generator=g)
    other = torch.randn(per, d, generator=g)
    raw = torch.cat([content, content, other])[None, None]  # frames 0, 1 (repeat), 2
    meta = _frames_layout(per, 3, text=0)
    positions = torch.arange(3 * per)[None, None].float() * 7
    rotated = rotate_by(raw, positions, inv_freq)
    packed = meta.pack()[:, None]
    packed[..., 1] = (torch.arange(3 * per) * 7)[None, None]  # the rope field: where each key is rotated
    view = tokenmem.LayerView(layer=0, keys=rotated, values=torch.ones_like(rotated), meta=TokenMeta.from_packed(packed),
                              state={}, mass=None, seen=3 * per, budget=8, new_tokens=0,
                              memory=SimpleNamespace(budget=8, context=SimpleNamespace(inv_freq=inv_freq)))
    sim = temporal_redundancy(view)[0, 0]
    torch.testing.assert_close(sim[per : 2 * per], torch.ones(per), rtol=0, atol=1e-5)
    assert bool((sim[:per] == 0).all())  # the first frame has no predecessor
    assert float(sim[2 * per :].max()) < 0.99
    view.memory.context.inv_freq = None  # no un-rotation: the rotated copies no longer look alike
    assert float(temporal_redundancy(view)[0, 0][per : 2 * per].min()) < 0.99


# ---------------------------------------------------------------------------------------------
# Benchmarks take their evictor list from the registry
# ---------------------------------------------------------------------------------------------
def test_benchmarks_take_the_registry_with_an_evictors_flag():
    import argparse

    from tokenmem.evictor_list import add_evictors_argument, registered

    names = registered()
    assert names[0] == "full" and set(ZOO) <= set(names) and len(names) == len(tokenmem.list_evictors())
    p = argparse.ArgumentParser()
    add_evictors_argument(p, exclude=("separator",))
    assert p.parse_args([]).evictors == [n for n in names if n != "separator"]
    assert p.parse_args(["--evictors", "snapkv", "ada"]).evictors == ["snapkv", "ada"]
    with pytest.raises(SystemExit):
        p.parse_args(["--evictors", "lru"])
    from tokenmem.zoo import transfer

    assert transfer.EVICTORS == tuple(names)
