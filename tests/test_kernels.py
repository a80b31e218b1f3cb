"""Every backend equals the reference (the specification); the dispatcher rejects bad input."""

import pytest
import torch

import tokenmem
from tokenmem import cache_kwargs
from conftest import padded_batch, tiny_model, twin
from tokenmem import kernels
from tokenmem.kernels import cpu, reference

SIZES = [(1, 1), (1, 7), (7, 7), (5, 40), (63, 63), (1, 65), (65, 65), (1000, 1000)]
GROUPS = [(8, 8), (8, 4), (8, 2), (8, 1)]  # GQA 1 / 2 / 4 / 8


def make_inputs(b, hq, hkv, q, n, d, dtype, padded, seed):
    g = torch.Generator().manual_seed(seed)
    # fresh random inputs without zeros
    def rnd(*shape):
        x = torch.randn(*shape, generator=g)
        return torch.where(x == 0, torch.full_like(x, 0.5), x)
    query, key, value = rnd(b, hq, q, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d)
    key_valid = query_valid = None
    if padded:
        key_valid = torch.ones(b, hkv, n, dtype=torch.bool)
        for row in range(1, b):
            key_valid[row, :, : min(n - 1, 3 * row)] = False
        query_valid = key_valid[:, 0, n - q :]
    return query.to(dtype), key.to(dtype), value.to(dtype), key_valid, query_valid


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("q,n", SIZES)
@pytest.mark.parametrize("hq,hkv", GROUPS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cpu_backend_equals_reference(q, n, hq, hkv, padded, dtype, tol):
    b, d = 2, 24
    seed = hash((q, n, hq, hkv, padded, str(dtype))) % 2**31
    query, key, value, key_valid, query_valid = make_inputs(b, hq, hkv, q, n, d, dtype, padded, seed)
    r = min(q, 9)
    rows = torch.full((b, hkv, r, n), float("nan"))  # poisoned: every element must be written
    blocks = {"block_q": 16, "block_k": 64} if q * n < 100_000 else {}
    out, mass = cpu.attention_with_stats(query, key, value, scaling=d**-0.5, key_valid=key_valid,
                                         query_valid=query_valid, need_mass=True, rows=rows, **blocks)
    ref_rows = torch.zeros(b, hkv, r, n)
    ref_out, ref_mass = reference.attention_with_stats(
        query.double(), key.double(), value.double(), scaling=d**-0.5, key_valid=key_valid,
        query_valid=query_valid, need_mass=True, rows=ref_rows)
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(mass).all()
    assert torch.isfinite(rows).all()
    live = torch.ones_like(out, dtype=torch.bool) if query_valid is None else query_valid[:, None, :, None].expand_as(out)
    assert rel_err(out[live], ref_out[live]) < tol
    assert rel_err(mass, ref_mass) < tol
    assert rel_err(rows, ref_rows) < tol
    if query_valid is not None:
        assert torch.all(out[~live] == 0)


@pytest.mark.parametrize("block", [5, None])
@pytest.mark.parametrize("contiguous", [True, False])
def test_compaction_equals_reference_and_reads_only_live_slots(block, contiguous):
    g = torch.Generator().manual_seed(5)
    b, h, cap, n, k = 2, 3, 70, 61, 23
    keys = torch.randn(b, h, cap, 16, generator=g)
    meta = torch.randint(0, 1000, (b, h, cap, 6), generator=g)
    state = torch.randn(b, h, cap, generator=g)
    keys[:, :, n:] = float("nan")  # poison beyond the live slots: must never be read
    meta[:, :, n:] = -999
    index = torch.sort(torch.stack([torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(h)])
                                    for _ in range(b)]), dim=-1).values
    ours = [keys.clone(), meta.clone(), state.clone()]
    if not contiguous:  # the gather path: buffers that are views with gaps between slots
        ours = [torch.cat([t, torch.zeros_like(t)], dim=-1)[..., : t.shape[-1]] if t.dim() == 4
                else torch.stack([t, t], dim=-1)[..., 0] for t in ours]
        assert not any(t.is_contiguous() for t in ours)
    cpu.compact_(ours, index, block=block)
    expected = [reference.gather_tokens(t[:, :, :n], index) for t in (keys, meta, state)]
    for got, exp, orig in zip(ours, expected, (keys, meta, state)):
        assert torch.equal(got[:, :, :k], exp)
        assert torch.equal(got[:, :, k:].nan_to_num(7.0), orig[:, :, k:].nan_to_num(7.0))  # untouched


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_h2o_keeps_the_same_tokens_on_every_backend(family, monkeypatch):
    base = tiny_model(family)
    ids, mask = padded_batch(2, 48, seed=11)
    kept = {}
    for name in ("cpu", "reference"):
        monkeypatch.setenv("TOKENMEM_KERNEL", name)
        model = twin(base)
        memory = tokenmem.TokenMemory(model, "h2o", budget=24, interval=4)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, memory), max_new_tokens=20,
                                 do_sample=False)
        kept[name] = (out, [layer.meta.position.clone() for layer in memory.layers])
        assert memory.stats()["evictions"] > 0
    assert torch.equal(kept["cpu"][0], kept["reference"][0])
    for a, b in zip(kept["cpu"][1], kept["reference"][1]):
        assert torch.equal(a, b)


class RowsProbe(tokenmem.Evictor):
    """Keeps everything it is asked to (scores by position) but reads the attention rows window."""

    name = "rows-probe"
    stats_window = 8

    def __init__(self):
        self.seen_rows = []

    def observe(self, view):
        self.seen_rows.append(view.rows.clone())

    def score(self, view):
        return view.meta.position.float()


def test_memory_rows_window_equals_eager_attention():
    eager = tiny_model("llama", attn="eager")
    ours = twin(eager)
    ids, mask = padded_batch(2, 30, seed=4)
    probe = RowsProbe()
    memory = tokenmem.TokenMemory(ours, probe, budget=1000)
    with torch.no_grad():
        ours(ids, attention_mask=mask, **cache_kwargs(ours, memory), use_cache=True)
        nxt = torch.tensor([[7], [9]])
        ours(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
             **cache_kwargs(ours, memory), use_cache=True)
        full_ids = torch.cat([ids, nxt], 1)
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        attn = eager(full_ids, attention_mask=full_mask, output_attentions=True).attentions
    layer = memory.layers[0]
    rows = layer.recent_rows  # [b, hkv, 8, 31]: the 8 newest queries (7 of the prompt + the decode step)
    assert rows.shape == (2, 2, 8, 31)
    expected = attn[0][:, :, -8:, :].reshape(2, 2, 2, 8, 31).mean(2)
    valid = full_mask.bool()[:, None, None, :].expand_as(rows)
    assert ((rows - expected).abs()[valid]).max() < 1e-5
    assert torch.all(rows[~valid] == 0)


def test_dispatcher_rejects_bad_input(monkeypatch):
    q = torch.randn(1, 4, 3, 8)
    k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(tokenmem.TokenmemError, match="dtype"):
        kernels.attention_with_stats(q.int(), k.int(), v.int(), scaling=1.0)
    with pytest.raises(tokenmem.TokenmemError, match="head dim"):
        kernels.attention_with_stats(q, torch.randn(1, 2, 5, 6), torch.randn(1, 2, 5, 6), scaling=1.0)
    with pytest.raises(tokenmem.TokenmemError, match="grouped"):
        kernels.attention_with_stats(torch.randn(1, 3, 3, 8), k, v, scaling=1.0)
    with pytest.raises(tokenmem.TokenmemError, match="key_valid"):
        kernels.attention_with_stats(q, k, v, scaling=1.0, key_valid=torch.ones(1, 2, 4, dtype=torch.bool))
    with pytest.raises(tokenmem.TokenmemError, match="devices: cpu -> cpu, cuda -> triton"):
        kernels.attention_with_stats(q.to("meta"), k.to("meta"), v.to("meta"), scaling=1.0)
    monkeypatch.setenv("TOKENMEM_KERNEL", "fpga")
    with pytest.raises(tokenmem.TokenmemError, match="not a backend"):
        kernels.attention_with_stats(q, k, v, scaling=1.0)


@pytest.mark.parametrize("factor", [1.0, 16.0, 20.0, 40.0])
@pytest.mark.parametrize("native", ["1", "0"])  # the compiled kernel, and the PyTorch path without a compiler
def test_cpu_mass_with_a_wide_spread_of_row_log_sum_exps(factor, native, monkeypatch):
    """Queries whose scores differ by far more than float32's exp range still give the exact mass."""
    monkeypatch.setenv("TOKENMEM_NATIVE", native)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 512, 32, generator=g), torch.randn(1, 2, 512, 32, generator=g), torch.randn(1, 2, 512, 32, generator=g)
    q[:, :, 256:] *= factor
    _, mass = cpu.attention_with_stats(q, k, v, scaling=32**-0.5, need_mass=True)
    _, ref = reference.attention_with_stats(q.double(), k.double(), v.double(), scaling=32**-0.5, need_mass=True)
    assert torch.isfinite(mass).all() and rel_err(mass, ref) < 1e-5
