"""The compiled fused CPU kernel (tokenmem.kernels.native, colmass.cpp) equals the reference; it is built at first
use, and a missing or broken compiler gives a warning and the PyTorch path, or an error with TOKENMEM_NATIVE=require."""

import pytest
import torch

import tokenmem
from tokenmem.kernels import cpu, native, reference

from test_kernels import make_inputs, rel_err

# panel and tile edges: the kernel works on 2 * W keys per tile (W = 8 or 16 floats) and 4 tiles per panel
SIZES = [(1, 1), (7, 7), (1, 65), (65, 65), (31, 127), (128, 128), (129, 129), (100, 257), (1000, 1000)]
GROUPS = [(8, 8), (8, 4), (8, 2), (8, 1)]
LONG = {"block_q": 16, "block_k": 64}  # blocks this small send short test calls down the long-call (two-pass) path


def reference_mass(query, key, value, scaling, causal=True, query_valid=None):
    _, mass = reference.attention_with_stats(query.double(), key.double(), value.double(), scaling=scaling,
                                             causal=causal, query_valid=query_valid, need_mass=True)
    return mass


def lse_of(query, key, scaling, causal=True):
    """Row log-sum-exp [b, hq, q] in float64 (independent of pass 1's kernels)."""
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    k = key.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    if causal:
        s = s.masked_fill(torch.ones(q, n, dtype=torch.bool).triu(n - q + 1), float("-inf"))
    return torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("q,n", SIZES)
@pytest.mark.parametrize("hq,hkv", GROUPS)
@pytest.mark.parametrize("causal", [True, False])
def test_colmass_equals_reference(q, n, hq, hkv, causal):
    b, d = 2, 24
    query, key, value, _, _ = make_inputs(b, hq, hkv, q, n, d, torch.float32, False, seed=hash((q, n, hq, causal)) % 2**31)
    mass = torch.full((b, hkv, n), float("nan"))  # poisoned: every element must be written
    got = native.colmass(query, key, lse_of(query, key, d**-0.5, causal), d**-0.5, causal, out=mass)
    assert got is mass and torch.isfinite(mass).all()
    assert rel_err(mass, reference_mass(query, key, value, d**-0.5, causal)) < 1e-5


@pytest.mark.parametrize("d", [7, 64, 128])
def test_colmass_head_sizes_bf16_strided_query_and_padded_queries(d):
    b, hq, hkv, q, n = 2, 8, 2, 70, 200
    query, key, value, _, _ = make_inputs(b, hq, hkv, q, n, d, torch.float32, False, seed=d)
    # the layout transformers hands over: [b, q, hq, d] transposed to [b, hq, q, d] (not contiguous)
    strided = query.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    lse = lse_of(query, key, d**-0.5)
    assert rel_err(native.colmass(strided, key, lse, d**-0.5, True), reference_mass(query, key, value, d**-0.5)) < 1e-5
    # padded queries (query_valid) give no mass, through the backend's long-call path (small blocks force it)
    valid = torch.ones(b, q, dtype=torch.bool)
    valid[1, :9] = False
    _, mass = cpu.attention_with_stats(query, key, value, scaling=d**-0.5, query_valid=valid, need_mass=True, **LONG)
    assert rel_err(mass, reference_mass(query, key, value, d**-0.5, query_valid=valid)) < 1e-5
    # bfloat16 inputs: computed in float32 from the rounded values
    qb, kb, vb = query.bfloat16(), key.bfloat16(), value.bfloat16()
    _, mass = cpu.attention_with_stats(qb, kb, vb, scaling=d**-0.5, need_mass=True, **LONG)
    assert rel_err(mass, reference_mass(qb, kb, vb, d**-0.5)) < 1e-2


def test_colmass_non_causal_with_more_queries_than_keys_and_empty_batches():
    query, key, value, _, _ = make_inputs(1, 4, 2, 1000, 500, 32, torch.float32, False, seed=9)
    _, mass = cpu.attention_with_stats(query, key, value, scaling=0.2, causal=False, need_mass=True)
    assert rel_err(mass, reference_mass(query, key, value, 0.2, causal=False)) < 1e-5
    empty = native.colmass(torch.randn(0, 4, 600, 16), torch.randn(0, 2, 600, 16), torch.zeros(0, 4, 600), 0.25, True)
    assert empty.shape == (0, 2, 600)


def test_colmass_is_deterministic_across_thread_counts():
    query, key, value, _, _ = make_inputs(1, 8, 2, 600, 900, 32, torch.float32, False, seed=3)
    lse = lse_of(query, key, 32**-0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.colmass(query, key, lse, 32**-0.5, True)
        torch.set_num_threads(2)
        two = native.colmass(query, key, lse, 32**-0.5, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each key's sum is made by one task in a fixed order


def test_cpu_backend_uses_the_compiled_kernel_and_the_fallback_agrees(monkeypatch):
    query, key, value, _, _ = make_inputs(1, 8, 2, 700, 700, 32, torch.float32, False, seed=5)
    calls = []
    real = native.colmass
    monkeypatch.setattr(native, "colmass", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, fused = cpu.attention_with_stats(query, key, value, scaling=32**-0.5, need_mass=True)
    assert calls, "the no-padding long-call path must use the compiled kernel"
    monkeypatch.setenv("TOKENMEM_NATIVE", "0")
    _, fallback = cpu.attention_with_stats(query, key, value, scaling=32**-0.5, need_mass=True)
    assert len(calls) == 1
    ref = reference_mass(query, key, value, 32**-0.5)
    assert rel_err(fused, ref) < 1e-5 and rel_err(fallback, ref) < 1e-5


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("TOKENMEM_CACHE", str(tmp_path))
    return tmp_path


def test_build_at_first_use_into_the_cache(fresh_native):
    fn = native.load()
    assert fn is not None
    built = list((fresh_native / "kernels").glob("colmass-*.so"))
    assert len(built) == 1
    assert native.build() == built[0]  # cached: the same file, not rebuilt
    assert built[0].stat().st_mode & 0o755 == 0o755  # loadable by others sharing the cache


def test_broken_compiler_warns_and_falls_back_or_fails_when_required(fresh_native, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # found on PATH, fails every call
    monkeypatch.setenv("TOKENMEM_NATIVE", "1")  # the default (the test command exports require)
    transposed = cpu._mass_transposed
    with pytest.warns(RuntimeWarning, match="fused CPU attention-mass kernel is unavailable"):
        assert native.load() is None
    query, key, value, _, _ = make_inputs(1, 4, 2, 300, 300, 16, torch.float32, False, seed=1)
    calls = []
    monkeypatch.setattr(cpu, "_mass_transposed", lambda *a: calls.append(1) or transposed(*a))
    _, mass = cpu.attention_with_stats(query, key, value, scaling=0.25, need_mass=True, **LONG)  # the PyTorch path
    assert calls
    assert rel_err(mass, reference_mass(query, key, value, 0.25)) < 1e-5
    monkeypatch.setenv("TOKENMEM_NATIVE", "require")
    with pytest.raises(tokenmem.TokenmemError, match="TOKENMEM_NATIVE=require.*building the fused CPU kernel failed"):
        native.load()
    monkeypatch.setenv("TOKENMEM_NATIVE", "sometimes")
    with pytest.raises(tokenmem.TokenmemError, match="TOKENMEM_NATIVE='sometimes'"):
        native.load()


def test_colmass_rejects_mismatched_shapes():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 9, 8)
    with pytest.raises(tokenmem.TokenmemError, match="lse"):
        native.colmass(q, k, torch.zeros(1, 4, 6), 1.0, True)
    with pytest.raises(tokenmem.TokenmemError, match="multiple of hkv"):
        native.colmass(torch.randn(1, 3, 5, 8), k, torch.zeros(1, 3, 5), 1.0, True)
    with pytest.raises(tokenmem.TokenmemError, match="out must be"):
        native.colmass(q, k, torch.zeros(1, 4, 5), 1.0, True, out=torch.zeros(1, 2, 8))
