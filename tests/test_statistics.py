"""The recorded attention statistics equal a float64 softmax reference and eager attention weights."""

import pytest
import torch
import torch.nn.functional as F

import tokenmem
from tokenmem import cache_kwargs
from conftest import padded_batch, tiny_model, twin
from tokenmem.kernels import reference


def dense_reference(q, k, v, key_valid, query_valid, scaling):
    """float64, n x n: output and per-key column mass (sum over valid queries, mean over the group)."""
    b, hq, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    q, k, v = q.double(), k.double(), v.double()
    kr = k.repeat_interleave(g, dim=1)
    vr = v.repeat_interleave(g, dim=1)
    s = q @ kr.transpose(-1, -2) * scaling
    allowed = torch.ones(nq, n, dtype=torch.bool).tril(n - nq)
    allowed = allowed[None, None] & key_valid.repeat_interleave(g, dim=1)[:, :, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = p @ vr
    p = p * query_valid[:, None, :, None]
    mass = p.sum(2).view(b, hkv, g, n).mean(2)
    return out, mass


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (8, 1), (4, 2)])
@pytest.mark.parametrize("nq,n", [(1, 1), (1, 37), (7, 7), (5, 40), (65, 65), (300, 300)])
def test_kernel_matches_float64_reference(hq, hkv, nq, n):
    g = torch.Generator().manual_seed(hq * 1000 + nq * 10 + n)
    b, d = 2, 16
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    key_valid = torch.ones(b, hkv, n, dtype=torch.bool)
    pad = min(3, n - 1)
    key_valid[1, :, :pad] = False  # left padding of row 1
    query_valid = key_valid[:, 0, n - nq:]
    out, mass = reference.attention_with_stats(
        q, k, v, scaling=d**-0.5, key_valid=key_valid, query_valid=query_valid, need_mass=True, chunk=16)
    ref_out, ref_mass = dense_reference(q, k, v, key_valid, query_valid, d**-0.5)
    assert rel_err(out[query_valid[:, None, :, None].expand_as(out)], ref_out[query_valid[:, None, :, None].expand_as(ref_out)]) < 1e-5
    assert rel_err(mass, ref_mass) < 1e-5
    assert torch.all(mass[~key_valid] == 0)


def test_kernel_output_matches_sdpa_without_padding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 50, 32, generator=g) for _ in range(3))
    out, _ = reference.attention_with_stats(q, k, v, scaling=32**-0.5)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(out, expected) < 1e-5


def test_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 200, 16, generator=g)
    k, v = torch.randn(1, 2, 260, 16, generator=g), torch.randn(1, 2, 260, 16, generator=g)
    a = reference.attention_with_stats(q, k, v, scaling=0.25, need_mass=True, chunk=7)
    b = reference.attention_with_stats(q, k, v, scaling=0.25, need_mass=True, chunk=1000)
    assert rel_err(a[0], b[0]) < 1e-6 and rel_err(a[1], b[1]) < 1e-6


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_model_statistics_match_eager_attention_weights(family):
    """Through a real tiny model: recorded mass == eager output_attentions column sums (valid queries,
    mean over each KV head's query group), batch 2 with left padding."""
    eager = tiny_model(family, attn="eager")
    ours = twin(eager)
    ids, mask = padded_batch(2, 30, seed=3)
    with torch.no_grad():
        attn = eager(ids, attention_mask=mask, output_attentions=True).attentions
        memory = tokenmem.TokenMemory(ours, "full", record_stats=True)
        ours(ids, attention_mask=mask, **cache_kwargs(ours, memory), use_cache=True)
    valid = mask.bool()
    for layer_idx, weights in enumerate(attn):  # [b, hq, q, n]
        mass = memory.layers[layer_idx].mass  # [b, hkv, n]
        b, hkv, n = mass.shape
        hq = weights.shape[1]
        expected = (weights * valid[:, None, :, None]).sum(2).view(b, hkv, hq // hkv, n).mean(2)
        assert rel_err(mass[valid[:, None, :].expand_as(mass)], expected[valid[:, None, :].expand_as(expected)]) < 1e-5
