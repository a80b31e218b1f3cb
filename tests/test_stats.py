"""``TokenMemory.stats()`` reports what the memory really holds: valid tokens (``held``, ``held_per_head``) and
their key/value bytes (``kv_bytes``), beside the allocated slots (``held_slots``) and bytes (``bytes``). They
differ where left padding or a ragged eviction (masked slots) fills slots with no token; counted here by hand
from the stored metadata and the buffers' shapes."""

from __future__ import annotations

import pytest
import torch

import tokenmem
from tokenmem.compat import cache_kwargs
from conftest import padded_batch, tiny_model
from tokenmem.meta import FLAGS, PAD
from tokenmem.occupancy import occupancy


def _by_hand(memory):
    """(valid counts [layer][row][head], valid K/V bytes, slots per layer, allocated bytes) from the buffers."""
    counts, kv, slots, total = [], 0, [], 0
    for layer in memory.layers:
        k, v = layer.key_buffer, layer.value_buffer
        flags = layer.meta_buffer[:, :, : layer.held, FLAGS]
        valid = (flags & PAD) == 0
        counts.append(valid.sum(-1).tolist())
        kv += int(valid.sum()) * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())
        slots.append(layer.held)
        total += sum(t.numel() * t.element_size() for t in layer.buffers())
    return counts, kv, slots, total


def _check(stats, memory, real=None):
    """``real``: the real (not padding) tokens each row has seen (default: every token seen)."""
    counts, kv, slots, total = _by_hand(memory)
    assert stats["held_per_head"] == counts
    assert stats["held_slots"] == slots
    assert stats["kv_bytes"] == kv and stats["bytes"] == total
    means = [sum(map(sum, c)) / sum(map(len, c)) for c in counts]
    assert stats["held"] == means
    real = real or [stats["seen"]] * len(counts[0])
    shares = [sum(map(sum, c)) / (len(c[0]) * sum(real)) for c in counts]  # valid held / real tokens seen
    assert stats["held_fraction"] == pytest.approx(sum(shares) / len(shares), rel=1e-12)
    report = occupancy(memory)
    assert report["slots"] == slots and report["held"] == counts and report["kv_bytes_valid"] == kv
    assert report["bytes"] == total


def test_left_padding_is_allocated_but_not_held():
    model = tiny_model("llama")
    ids, mask = padded_batch(2, 30, seed=1, pad=6)  # row 1: 6 padding tokens
    memory = tokenmem.TokenMemory(model, "full")
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, memory), use_cache=True)
    stats = memory.stats()
    _check(stats, memory, real=[30, 24])
    assert stats["held_fraction"] == 1.0  # every real token is held
    assert stats["held_slots"] == [30, 30]
    assert stats["held_per_head"] == [[[30, 30], [24, 24]]] * 2
    assert stats["held"] == [27, 27] and isinstance(stats["held"][0], int)  # (30 + 24) / 2
    per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads x head dim 16, float32
    assert stats["kv_bytes"] == 2 * (30 + 24) * per_token  # the padding's slots are not counted
    assert stats["kv_bytes"] < occupancy(memory)["kv_bytes_slots"] == 2 * 2 * 30 * per_token
    assert "held/layer=27 (slots 30)" in memory.summary()


def test_a_uniform_evictor_with_left_padding_holds_at_most_the_budget_in_every_head():
    model = tiny_model("llama")
    ids, mask = padded_batch(2, 40, seed=2, pad=30)  # row 1 has 10 real tokens, fewer than the budget
    memory = tokenmem.TokenMemory(model, "h2o", budget=16, interval=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, memory), use_cache=True)
    stats = memory.stats()
    _check(stats, memory, real=[40, 10])
    assert stats["held_fraction"] == (16 + 10) / (40 + 10)
    assert stats["held_slots"] == [16, 16]
    assert stats["held_per_head"] == [[[16, 16], [10, 10]]] * 2  # the short row holds all it has
    assert stats["held"] == [13, 13]


def test_masked_slots_of_a_ragged_eviction_are_not_held():
    """A threshold evictor whose heads keep different counts: the memory masks the surplus slots."""

    class OddHeads(tokenmem.Evictor):  # head 0 keeps its even positions, head 1 every position above 20
        name = "odd-heads"
        threshold = 0.0

        def score(self, view):
            pos = view.meta.position
            head = torch.arange(pos.shape[1])[None, :, None]
            return torch.where(head == 0, (pos % 2 == 0).float(), (pos > 20).float()) - 0.5

    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, OddHeads(), budget=40, interval=64)
    with torch.no_grad():
        model(torch.randint(3, 300, (1, 50)), **cache_kwargs(model, memory), use_cache=True)
    stats = memory.stats()
    _check(stats, memory)
    # head 0: the 25 even positions; head 1: positions 21..49 (29); slots: the larger count
    assert stats["held_per_head"] == [[[25, 29]]] * 2
    assert stats["held_slots"] == [29, 29]
    assert stats["held"] == [27, 27]
    assert "held/layer=27 (slots 29)" in memory.summary()


def test_stats_of_a_memory_without_eviction_match_the_slots():
    model = tiny_model("llama")
    memory = tokenmem.TokenMemory(model, "sink", budget=24, interval=4)
    with torch.no_grad():
        model(torch.randint(3, 300, (1, 50)), **cache_kwargs(model, memory), use_cache=True)
    stats = memory.stats()
    _check(stats, memory)
    assert stats["held"] == stats["held_slots"] == [24, 24]
    assert stats["kv_bytes"] == occupancy(memory)["kv_bytes_slots"]
    assert "(slots" not in memory.summary()


def test_stats_of_an_empty_memory():
    memory = tokenmem.TokenMemory(tiny_model("llama"), "sink", budget=8)
    stats = memory.stats()
    assert stats["held"] == [0, 0] and stats["held_slots"] == [0, 0] and stats["held_per_head"] == [[], []]
    assert stats["kv_bytes"] == stats["bytes"] == 0 and stats["held_fraction"] == 1.0
    assert "held/layer=0" in memory.summary()


def test_summary_shows_a_fractional_mean():
    model = tiny_model("llama")
    ids, mask = padded_batch(2, 31, seed=1, pad=6)
    memory = tokenmem.TokenMemory(model, "full")
    with torch.no_grad():
        model(ids[:, 1:], attention_mask=mask[:, 1:], **cache_kwargs(model, memory), use_cache=True)
    # rows of 30 and 25 valid tokens (the first column dropped): a mean of 27.5
    assert memory.stats()["held"] == [27.5, 27.5]
    assert "held/layer=27.5 (slots 30)" in memory.summary()


def test_padding_counts_follow_the_rows_through_generate_with_beams():
    """Beam search reorders and repeats the memory's rows; the padding each row has seen goes with it, so a full
    cache still holds 100% of the real tokens."""
    model = tiny_model("llama")
    ids, mask = padded_batch(2, 20, seed=3, pad=7)
    memory = tokenmem.TokenMemory(model, "full")
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **cache_kwargs(model, memory), max_new_tokens=5, num_beams=3,
                       do_sample=False)
    stats = memory.stats()
    assert memory.padding_seen.tolist() == [0, 0, 0, 7, 7, 7]
    assert stats["held_fraction"] == 1.0
    assert [len(layer) for layer in stats["held_per_head"]] == [6, 6]
    _check(stats, memory, real=[stats["seen"]] * 3 + [stats["seen"] - 7] * 3)
