"""Property tests of the eviction invariants, through the real memory + attention path (no model)."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenmem
from tokenmem.attention import tokenmem_attention
from tokenmem.errors import InputError


class ScriptedEvictor(tokenmem.Evictor):
    """Random scores and a random protected set, drawn from a seed; keeps a per-token state that
    mirrors the token's position so that alignment after compaction can be checked."""

    name = "scripted"

    def __init__(self, seed, protect_rate):
        self.g = torch.Generator().manual_seed(seed)
        self.protect_rate = protect_rate
        self.protected_positions = []

    def state_spec(self):
        return {"mirror": ((2,), torch.float64)}

    def observe(self, view):
        new = view.new_tokens
        pos = view.meta.position[..., -new:].double()
        view.state["mirror"][..., -new:, 0] = pos
        view.state["mirror"][..., -new:, 1] = -pos

    needs_stats = True

    def score(self, view):
        return torch.rand(view.meta.position.shape, generator=self.g)

    def protect(self, view):
        shape = view.meta.position.shape
        mask = torch.rand(shape, generator=self.g) < self.protect_rate
        # never ask for more than the budget
        rank = torch.cumsum(mask.int(), -1)
        mask &= rank <= view.budget // 2
        self.protected_positions.append(view.meta.position[mask].tolist())
        self.last_protect = (view.meta.position.clone(), mask.clone())
        return mask


def _step(memory, layer, q_len, b, h, d, start, pad_rows):
    """Append q_len tokens whose keys encode (position, batch, head) and run the tokenmem attention."""
    pos = torch.arange(start, start + q_len, dtype=torch.float32)
    k = torch.zeros(b, h, q_len, d)
    k[..., 0] = pos
    k[..., 1] = torch.arange(b, dtype=torch.float32)[:, None, None]
    k[..., 2] = torch.arange(h, dtype=torch.float32)[None, :, None]
    v = k.clone() * 2
    keys, _ = memory.update(k, v, layer)
    q = torch.randn(b, 2 * h, q_len, d)
    mask2d = None
    if pad_rows:
        mask2d = torch.ones(b, start + q_len, dtype=torch.bool)
        for row, pad in pad_rows.items():
            mask2d[row, :pad] = False
    module = SimpleNamespace(layer_idx=layer, is_causal=True)
    tokenmem_attention(module, q, keys, memory.layers[layer].values, mask2d, scaling=0.5)


def one_thread(test):
    """Run each example on one torch thread: these tensors are tiny, and on a busy machine a second thread only
    waits (seconds per example instead of milliseconds)."""
    import functools

    @functools.wraps(test)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return test(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


@given(
    seed=st.integers(0, 10_000),
    budget=st.integers(4, 40),
    interval=st.integers(1, 16),
    chunks=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    protect_rate=st.floats(0.0, 0.5),
    pad=st.integers(0, 6),
)
@one_thread
def test_eviction_invariants(seed, budget, interval, chunks, batch, heads, protect_rate, pad):
    evictor = ScriptedEvictor(seed, protect_rate)
    memory = tokenmem.TokenMemory(None, evictor, budget=budget, interval=interval)
    d = 4
    start = 0
    pad_rows = {row: min(pad * row, chunks[0] - 1) for row in range(1, batch)} if pad else {}
    for q_len in chunks:
        _step(memory, 0, q_len, batch, heads, d, start, pad_rows)
        start += q_len
        layer = memory.layers[0]
        meta = layer.meta
        positions = meta.position  # [b, h, n]
        # order by original position is preserved (strictly increasing per row and head)
        assert torch.all(positions[..., 1:] > positions[..., :-1])
        # metadata stays aligned with keys, values and evictor state
        assert torch.equal(layer.keys[..., 0].long(), positions)
        assert torch.equal(layer.keys[..., 1].long(), torch.arange(batch)[:, None, None].expand_as(positions))
        assert torch.equal(layer.keys[..., 2].long(), torch.arange(heads)[None, :, None].expand_as(positions))
        assert torch.equal(layer.values, 2 * layer.keys)
        assert torch.equal(layer.token_state["mirror"][..., 0].long(), positions)
        assert torch.equal(layer.token_state["mirror"][..., 1].long(), -positions)
        # padding flags follow their tokens
        for row, p in pad_rows.items():
            assert torch.equal(~meta.valid[row], positions[row] < p)
        # protected tokens always survive the eviction that protected them
        if hasattr(evictor, "last_protect"):
            before, mask = evictor.last_protect
            del evictor.last_protect
            for bi in range(batch):
                for hi in range(heads):
                    wanted = set(before[bi, hi][mask[bi, hi]].tolist())
                    wanted = {p for p in wanted if p >= pad_rows.get(bi, 0)}  # padding is never protected
                    assert wanted <= set(positions[bi, hi].tolist())
        # the budget holds: a multi-token call always ends within budget, a single token may add up to
        # interval - 1 tokens over it between evictions
        limit = budget if q_len > 1 else budget + interval - 1
        assert layer.held <= limit
        if layer.evictions and layer.since_evict == 0:
            assert layer.held == budget


def test_select_kept_prefers_protected_then_score():
    scores = torch.tensor([[[5.0, 1.0, 3.0, 4.0, 2.0]]])
    protect = torch.tensor([[[False, True, False, False, False]]])
    valid = torch.tensor([[[True, True, True, True, False]]])
    assert tokenmem.select_kept(scores, protect, valid, 3).tolist() == [[[0, 1, 3]]]


def test_select_kept_breaks_ties_towards_newer_tokens():
    scores = torch.ones(1, 1, 96)
    none = torch.zeros(1, 1, 96, dtype=torch.bool)
    kept = tokenmem.select_kept(scores, none, ~none, 32)
    assert kept.tolist() == [[list(range(64, 96))]]


@given(
    seed=st.integers(0, 10_000),
    budget=st.integers(4, 40),
    interval=st.integers(1, 16),
    decode_span=st.integers(1, 8),
    chunks=st.lists(st.integers(1, 12), min_size=1, max_size=12),
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
)
@one_thread
def test_decode_span_keeps_held_within_budget_plus_interval(seed, budget, interval, decode_span, chunks, batch, heads):
    """Any chunking: calls of at most ``decode_span`` tokens leave at most ``budget + interval - 1`` tokens, longer
    calls at most ``budget``; ``seen`` counts every token fed, and grows with every call."""
    evictor = ScriptedEvictor(seed, 0.2)
    memory = tokenmem.TokenMemory(None, evictor, budget=budget, interval=interval, decode_span=decode_span)
    fed = 0
    for q_len in chunks:
        seen_before = memory.seen
        _step(memory, 0, q_len, batch, heads, 4, fed, {})
        fed += q_len
        layer = memory.layers[0]
        assert memory.seen == layer.seen == fed > seen_before
        assert layer.held <= (budget + interval - 1 if q_len <= decode_span else budget)
        assert torch.equal(layer.keys[..., 0].long(), layer.meta.position)  # compaction kept keys and metadata aligned


@given(
    seed=st.integers(0, 10_000),
    chunks=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    tensor=st.sampled_from(["keys", "values"]),
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    where=st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 9), st.integers(0, 3)),
)
@one_thread
def test_non_finite_keys_or_values_change_nothing(seed, chunks, tensor, value, where):
    """NaN or inf anywhere in a call's keys or values: InputError, and keys, values, metadata, evictor state and
    counters are exactly as before; the next clean call goes through."""
    memory = tokenmem.TokenMemory(None, ScriptedEvictor(seed, 0.2), budget=16, interval=4)
    fed = 0
    for q_len in chunks:
        _step(memory, 0, q_len, 2, 2, 4, fed, {})
        fed += q_len
    layer = memory.layers[0]
    before = (layer.seen, layer.held, layer.since_evict, layer.evictions, layer.keys.clone(), layer.values.clone(),
              layer.packed_meta.clone(), layer.token_state["mirror"].clone())
    b, h, t, d = where
    k, v = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)
    (k if tensor == "keys" else v)[b, h, t, d] = value
    with pytest.raises(InputError, match=f"received {tensor} with NaN or inf"):
        memory.update(k, v, 0)
    after = (layer.seen, layer.held, layer.since_evict, layer.evictions, layer.keys, layer.values, layer.packed_meta,
             layer.token_state["mirror"])
    assert before[:4] == after[:4] and all(torch.equal(x, y) for x, y in zip(before[4:], after[4:]))
    assert layer.pending == 0
    _step(memory, 0, 3, 2, 2, 4, fed, {})
    assert memory.seen == fed + 3


_MODELS = {}


def _twins():
    """A tiny Llama prepared for tokenmem and an unprepared copy with the same weights (built once)."""
    if not _MODELS:
        from conftest import tiny_model, twin

        plain = tiny_model("llama")
        ours = twin(plain)
        tokenmem.prepare_model(ours)
        _MODELS["pair"] = (ours, plain)
    return _MODELS["pair"]


@settings(max_examples=20)
@given(
    seed=st.integers(0, 10_000),
    chunks=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    positions=st.sampled_from(["counting", "shuffled", "repeated", "restarting"]),
    evictor=st.sampled_from(["full", "h2o", "sink"]),
)
@one_thread
def test_without_eviction_the_memory_equals_dynamic_cache(seed, chunks, positions, evictor):
    """Any chunking, and position ids out of order, repeated or restarting at every call (transformers takes them
    as given; so does the memory in ``original`` mode): a memory that never evicts (no budget, or one above the
    stream) gives the logits of a DynamicCache call for call."""
    from transformers import DynamicCache

    from tokenmem import cache_kwargs

    ours, plain = _twins()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (1, sum(chunks)), generator=g)
    memory = tokenmem.TokenMemory(ours, evictor, budget=None if evictor == "full" else 1000, interval=4)
    cache = DynamicCache(config=plain.config)
    start, given = 0, []
    for q_len in chunks:
        pos = torch.arange(start, start + q_len)
        if positions == "shuffled":
            pos = pos[torch.randperm(q_len, generator=g)]
        elif positions == "repeated":
            pos = torch.randint(0, start + q_len, (q_len,), generator=g).sort().values
        elif positions == "restarting":
            pos = torch.arange(q_len)
        given.append(pos)
        chunk = {"input_ids": ids[:, start : start + q_len], "position_ids": pos[None], "use_cache": True}
        with torch.no_grad():
            got = ours(**chunk, **cache_kwargs(ours, memory)).logits
            want = plain(**chunk, **cache_kwargs(plain, cache)).logits
        assert (got - want).abs().max().item() <= 1e-5
        start += q_len
    assert memory.seen == start and memory.stats()["evictions"] == 0
    assert memory.layers[0].meta.rope[0, 0].tolist() == torch.cat(given).tolist()  # stored as the model was given them
