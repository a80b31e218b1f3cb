"""Peer comparison with NVIDIA's kvpress: tokenmem's evictors keep the tokens kvpress's presses keep.

Acceptance criterion: for the same tiny Llama and prompt, the token set kept by tokenmem's ``sink``
evictor equals the one kvpress's ``StreamingLLMPress`` keeps at the same compression, in every layer
and KV head.

How kvpress chooses (kvpress 0.5.5, ``presses/streaming_llm_press.py`` + ``scorer_press.py``):
``with press(model):`` registers a forward hook on every attention layer; during prefill (only) the
hook replaces that layer's ``DynamicCache`` keys/values by the ``n_kept = int(n * (1 - compression_ratio))``
best-scored rows (``kvpress.utils.compute_n_kept``). StreamingLLM scores 1 for the first ``n_sink`` tokens
and the last ``n_kept - n_sink`` ones, 0 in between. The hook runs after the layer's attention, so the
keys kvpress keeps are exactly rows of the uncompressed cache; we recover their positions by matching
rows against an uncompressed run of the same model. tokenmem reports its kept positions in
``layer.meta.position``.

Also compared (same semantics, so the same kept sets / the same continuation are expected):

- ``recent`` (sliding window) == ``StreamingLLMPress(n_sink=0)``;
- greedy decoding after a StreamingLLM-compressed prefill, as kvpress's pipeline decodes (position ids
  continue from the uncompressed context length) == tokenmem ``positions="original"`` with an interval
  longer than the decode (no eviction while decoding, as kvpress);
- ``KeyRerotationPress(StreamingLLMPress)`` (kept keys re-rotated to slots ``0..n_kept-1``, decoding
  continues at ``n_kept``) == tokenmem ``positions="shift"``.

Not compared: ``ObservedAttentionPress`` vs ``h2o`` (kvpress divides each key's summed attention by the
number of queries that can see it and keeps no recent window; tokenmem's H2O ranks by the raw sum and
protects a recent window), nor presses without a tokenmem counterpart (SnapKV, TOVA, Knorm, random...).

The kvpress model and the tokenmem model are two instances with identical weights and *separate*
config objects: creating a TokenMemory switches its model's ``config._attn_implementation`` to
``"tokenmem"``, which would also switch any model sharing that config object.
"""

from __future__ import annotations

import copy

import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from kvpress import KeyRerotationPress, StreamingLLMPress  # noqa: E402
from kvpress.utils import compute_n_kept  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import tokenmem  # noqa: E402

pytestmark = pytest.mark.peers

PROMPT_LEN = 100
LAYERS = 3
KV_HEADS = 2
DECODE_STEPS = 8


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,  # GQA: 2 query heads per KV head
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )


@pytest.fixture(scope="module")
def models():
    """(kvpress model, tokenmem model): identical weights, separate modules and config objects."""
    torch.manual_seed(1234)
    peer = LlamaForCausalLM(_config()).eval()
    ours = LlamaForCausalLM(_config()).eval()
    ours.load_state_dict(peer.state_dict())
    assert peer.config is not ours.config
    return peer, ours


def _prompt(batch: int = 1, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def _check_peer_is_plain(peer) -> None:
    # the kvpress model must keep its own attention (a TokenMemory on a shared config would switch it)
    assert peer.config._attn_implementation == "sdpa", peer.config._attn_implementation


@torch.no_grad()
def _kvpress_prefill(peer, ids, press=None):
    _check_peer_is_plain(peer)
    cache = DynamicCache()
    if press is None:
        out = peer(ids, past_key_values=cache)
    else:
        with press(peer):
            out = peer(ids, past_key_values=cache)
    return cache, out.logits


@torch.no_grad()
def _tokenmem_prefill(ours, ids, evictor, budget, **options):
    mem = tokenmem.TokenMemory(ours, evictor, budget=budget, **options)
    out = ours(ids, past_key_values=mem)
    assert ours.config._attn_implementation == "tokenmem"
    return mem, out.logits


def _positions_of_rows(kept: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Original positions ``[b, h, k]`` of the rows ``kept [b, h, k, d]`` inside ``full [b, h, n, d]``,
    every kept row matching exactly one full row bit for bit."""
    match = (kept[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)  # [b, h, k, n]
    count = match.sum(-1)
    assert bool((count == 1).all()), (
        f"kvpress kept rows that do not match exactly one uncompressed row (match counts {count.unique().tolist()})"
    )
    return match.to(torch.int8).argmax(-1)


def _as_sets(positions: torch.Tensor) -> list[list[list[int]]]:
    return torch.sort(positions, dim=-1).values.tolist()


def _streaming_expected(n: int, n_kept: int, n_sink: int) -> list[int]:
    return list(range(n_sink)) + list(range(n - (n_kept - n_sink), n))


def _compare_kept_sets(peer, ours, ids, press, evictor, budget, *, sinks, **options):
    """kvpress ``press`` vs ``TokenMemory(ours, evictor, budget, **options)`` on one prefill of ``ids``."""
    full, full_logits = _kvpress_prefill(peer, ids)
    cache, _ = _kvpress_prefill(peer, ids, press)
    mem, logits = _tokenmem_prefill(ours, ids, evictor, budget, **options)
    n_kept = compute_n_kept(ids.shape[1], press.compression_ratio)
    b = ids.shape[0]
    expected = _streaming_expected(ids.shape[1], n_kept, sinks)
    # the prefill itself is unaffected by the eviction at its end (both evict after attention)
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=1e-4)
    assert len(cache.layers) == len(mem.layers) == LAYERS
    for i in range(LAYERS):
        assert cache.layers[i].keys.shape[2] == n_kept
        peer_pos = _positions_of_rows(cache.layers[i].keys, full.layers[i].keys)
        ours_pos = mem.layers[i].meta.position
        assert tuple(ours_pos.shape) == (b, KV_HEADS, n_kept), f"layer {i}: tokenmem holds {tuple(ours_pos.shape)}"
        peer_sets, ours_sets = _as_sets(peer_pos), _as_sets(ours_pos)
        # ground truth is what the StreamingLLM rule says (guards against a vacuous comparison)
        assert peer_sets == [[expected] * KV_HEADS] * b, f"layer {i}: kvpress kept an unexpected set"
        assert ours_sets == peer_sets, f"layer {i}: tokenmem kept {ours_sets}, kvpress kept {peer_sets}"
        # and tokenmem's slots really hold those tokens' keys and values (as kvpress's do)
        order = torch.sort(peer_pos, dim=-1).indices[..., None].expand_as(cache.layers[i].keys)
        torch.testing.assert_close(mem.layers[i].keys, cache.layers[i].keys.gather(2, order), rtol=0, atol=1e-5)
        torch.testing.assert_close(mem.layers[i].values, cache.layers[i].values.gather(2, order), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The acceptance criterion: sink == StreamingLLMPress
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression_ratio", [0.25, 0.5, 0.75])
def test_sink_keeps_the_tokens_streamingllm_keeps(models, compression_ratio):
    peer, ours = models
    ids = _prompt()
    press = StreamingLLMPress(compression_ratio=compression_ratio)  # n_sink=4, tokenmem's default too
    n_kept = compute_n_kept(PROMPT_LEN, compression_ratio)
    _compare_kept_sets(peer, ours, ids, press, "sink", n_kept, sinks=4, interval=1)


@pytest.mark.parametrize("compression_ratio", [0.25, 0.5, 0.75])
def test_sink_fraction_budget_keeps_the_tokens_streamingllm_keeps(models, compression_ratio):
    """A float budget is the kept fraction: 1 - compression_ratio (exact products here; for non-integral
    ones tokenmem rounds up, kvpress down)."""
    peer, ours = models
    press = StreamingLLMPress(compression_ratio=compression_ratio)
    _compare_kept_sets(peer, ours, _prompt(), press, "sink", 1.0 - compression_ratio, sinks=4, interval=1)


@pytest.mark.parametrize(("n_sink", "compression_ratio"), [(1, 0.5), (8, 0.3), (16, 0.6)])
def test_sink_with_other_sink_counts_and_a_batch(models, n_sink, compression_ratio):
    peer, ours = models
    ids = _prompt(batch=2, seed=11)
    press = StreamingLLMPress(compression_ratio=compression_ratio, n_sink=n_sink)
    n_kept = compute_n_kept(PROMPT_LEN, compression_ratio)
    _compare_kept_sets(peer, ours, ids, press, "sink", n_kept, sinks=n_sink, interval=1, n_sink=n_sink)


# ---------------------------------------------------------------------------------------------
# recent == StreamingLLMPress without sinks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression_ratio", [0.25, 0.5, 0.75])
def test_recent_keeps_the_tokens_streamingllm_without_sinks_keeps(models, compression_ratio):
    peer, ours = models
    press = StreamingLLMPress(compression_ratio=compression_ratio, n_sink=0)
    n_kept = compute_n_kept(PROMPT_LEN, compression_ratio)
    _compare_kept_sets(peer, ours, _prompt(seed=3), press, "recent", n_kept, sinks=0, interval=1)


# ---------------------------------------------------------------------------------------------
# Decoding after the compressed prefill, as kvpress's pipeline decodes
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _kvpress_decode(peer, cache, first_logits, start_position: int, steps: int):
    """kvpress's ``KVPressTextGenerationPipeline.generate_answer`` loop: greedy, explicit position ids."""
    _check_peer_is_plain(peer)
    logits = [first_logits[:, -1]]
    tokens = [first_logits[:, -1].argmax(-1)]
    for i in range(steps):
        position_ids = torch.full((tokens[-1].shape[0], 1), start_position + i, dtype=torch.long)
        out = peer(tokens[-1][:, None], past_key_values=cache, position_ids=position_ids)
        logits.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@torch.no_grad()
def _tokenmem_decode(ours, mem, first_logits, steps: int):
    """Plain greedy decoding with the memory (tokenmem derives the positions itself)."""
    logits = [first_logits[:, -1]]
    tokens = [first_logits[:, -1].argmax(-1)]
    for _ in range(steps):
        out = ours(tokens[-1][:, None], past_key_values=mem)
        logits.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@torch.no_grad()
def _full_cache_logits(peer, ids, tokens):
    """Logits of the uncompressed model teacher-forced on ``tokens`` (to show compression matters here)."""
    _check_peer_is_plain(peer)
    out = peer(torch.cat([ids, tokens[:, :-1]], 1))
    return out.logits[:, ids.shape[1] - 1 :]


@pytest.mark.parametrize("compression_ratio", [0.5, 0.75])
def test_decoding_after_streamingllm_prefill_matches_original_positions(models, compression_ratio):
    peer, ours = models
    ids = _prompt(seed=5)
    n_kept = compute_n_kept(PROMPT_LEN, compression_ratio)
    cache, peer_first = _kvpress_prefill(peer, ids, StreamingLLMPress(compression_ratio=compression_ratio))
    peer_tokens, peer_logits = _kvpress_decode(peer, cache, peer_first, PROMPT_LEN, DECODE_STEPS)
    # interval > decode steps: no eviction while decoding, like a prefill-only press
    mem, ours_first = _tokenmem_prefill(ours, ids, "sink", n_kept, interval=64)
    ours_tokens, ours_logits = _tokenmem_decode(ours, mem, ours_first, DECODE_STEPS)

    assert mem.layers[0].held == cache.layers[0].keys.shape[2] == n_kept + DECODE_STEPS
    assert torch.equal(ours_tokens, peer_tokens), f"tokenmem {ours_tokens.tolist()} vs kvpress {peer_tokens.tolist()}"
    torch.testing.assert_close(ours_logits, peer_logits, rtol=0, atol=1e-4)
    full_logits = _full_cache_logits(peer, ids, peer_tokens)
    assert float((full_logits[:, 1:] - peer_logits[:, 1:]).abs().max()) > 1e-3, "compression changed nothing here"


@pytest.mark.parametrize("compression_ratio", [0.5, 0.75])
def test_shift_positions_match_key_rerotation_press(models, compression_ratio):
    """``KeyRerotationPress(StreamingLLMPress)`` re-rotates the kept keys to slots ``0..n_kept-1`` and the
    pipeline decodes on from ``n_kept``: tokenmem's ``positions="shift"``."""
    peer, ours = models
    ids = _prompt(seed=9)
    n_kept = compute_n_kept(PROMPT_LEN, compression_ratio)
    press = KeyRerotationPress(press=StreamingLLMPress(compression_ratio=compression_ratio))
    cache, peer_first = _kvpress_prefill(peer, ids, press)
    mem, ours_first = _tokenmem_prefill(ours, ids, "sink", n_kept, interval=64, positions="shift")
    expected = _streaming_expected(PROMPT_LEN, n_kept, 4)
    for i in range(LAYERS):
        meta = mem.layers[i].meta
        assert meta.position.tolist() == [[expected] * KV_HEADS]
        assert meta.rope.tolist() == [[list(range(n_kept))] * KV_HEADS]
        torch.testing.assert_close(mem.layers[i].keys, cache.layers[i].keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(mem.layers[i].values, cache.layers[i].values, rtol=0, atol=1e-5)

    peer_tokens, peer_logits = _kvpress_decode(peer, cache, peer_first, n_kept, DECODE_STEPS)
    ours_tokens, ours_logits = _tokenmem_decode(ours, mem, ours_first, DECODE_STEPS)
    assert torch.equal(ours_tokens, peer_tokens), f"tokenmem {ours_tokens.tolist()} vs kvpress {peer_tokens.tolist()}"
    torch.testing.assert_close(ours_logits, peer_logits, rtol=0, atol=1e-4)
