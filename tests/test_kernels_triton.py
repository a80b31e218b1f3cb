"""The Triton backend against the reference specification, run in Triton's interpreter on CPU tensors.

There is no GPU here: ``TRITON_INTERPRET=1`` must be set before triton is imported, so it is set
at the top of this module (``setdefault``: a GPU run can set it to 0). The interpreter is slow, so
sizes are small except one 1000-token case.

Errors are normwise: ``max |triton - ref| / max |ref|`` per tensor, with the reference computed
on the same inputs cast to float64. Outputs the backend allocates are poisoned (``torch.empty``
returns NaN-filled floats during the call) and ``rows`` is preallocated with NaN, so an element the
kernels do not write shows up as non-finite.

The bfloat16 output error (a few 1e-3) is mostly the final rounding to bfloat16, which the
interpreter does toward zero (up to 2^-7 relative) where a GPU rounds to nearest; mass and rows are
float32 and match to ~1e-6 for every dtype.
"""

from __future__ import annotations

import contextlib
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from tokenmem.errors import TokenmemError  # noqa: E402
from tokenmem.kernels import reference  # noqa: E402
from tokenmem.kernels import triton_backend as tk  # noqa: E402

if not tk._INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)

DEVICE = "cpu" if tk._INTERPRETED else "cuda"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
MAX_ERR: dict[str, float] = {}  # worst error seen per dtype/tensor, printed at the end with -s


def _seed(*key) -> torch.Generator:
    """A new, reproducible seed per case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@contextlib.contextmanager
def _poisoned_empty():
    """``torch.empty`` returns NaN-filled floating tensors while the backend runs."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    scale = want.double().abs().max().clamp_min(1e-30)
    return ((got.double() - want.double()).abs().max() / scale).item()


def _record(dtype, name, err):
    k = f"{str(dtype).removeprefix('torch.')}/{name}"
    MAX_ERR[k] = max(MAX_ERR.get(k, 0.0), err)


def _inputs(gen, b, hq, hkv, q, n, d, dv, dtype, pads=None, per_head=False):
    query = torch.randn(b, hq, q, d, generator=gen).to(dtype)
    key = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    value = torch.randn(b, hkv, n, dv, generator=gen).to(dtype)
    key_valid = query_valid = None
    if per_head:  # arbitrary validity per KV head (e.g. after per-head eviction); newest slot valid
        key_valid = torch.rand(b, hkv, n, generator=gen) < 0.7
        key_valid[..., -1] = True
    elif pads is not None:  # left padding, different per batch row; padded queries are invalid
        key_valid = torch.ones(b, 1, n, dtype=torch.bool)
        for i, p in enumerate(pads):
            key_valid[i, :, :p] = False
        query_valid = key_valid[:, 0, n - q:].clone()
    return query, key, value, key_valid, query_valid


def _check_against_reference(query, key, value, *, dtype, r=None, need_mass=True, **kw):
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    scaling = d ** -0.5
    rows = torch.full((b, hkv, r, n), float("nan"), device=DEVICE) if r is not None else None
    dev = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    kw_dev = {k: dev(v) for k, v in kw.items()}
    with _poisoned_empty():
        out, mass = tk.attention_with_stats(dev(query), dev(key), dev(value), scaling=scaling,
                                            need_mass=need_mass, rows=rows, **kw_dev)
    want_rows = torch.full((b, hkv, r, n), float("nan"), dtype=torch.float64) if r is not None else None
    want_out, want_mass = reference.attention_with_stats(query.double(), key.double(), value.double(),
                                                         scaling=scaling, need_mass=need_mass, rows=want_rows, **kw)
    assert out.dtype == dtype and out.shape == (b, hq, q, value.shape[-1])
    assert torch.isfinite(out).all(), "some output elements were not written"
    errors = {"out": _err(out.cpu(), want_out)}
    if need_mass:
        assert mass.dtype == torch.float32 and mass.shape == (b, hkv, n)
        assert torch.isfinite(mass).all(), "some mass elements were not written"
        errors["mass"] = _err(mass.cpu(), want_mass)
    else:
        assert mass is None
    if r is not None:
        assert torch.isfinite(rows).all(), "some rows elements were not written"
        errors["rows"] = _err(rows.cpu(), want_rows)
    for name, err in errors.items():
        _record(dtype, name, err)
        assert err < TOL[dtype], f"{name}: relative error {err:.3g} >= {TOL[dtype]}"
    return out, mass, rows


SIZES = [(1, 1), (1, 7), (7, 7), (63, 63), (1, 65), (65, 65), (5, 40)]
GROUPS = [8, 4, 2, 1]  # KV heads for 8 query heads: GQA groups 1, 2, 4, 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hkv", GROUPS, ids=[f"g{8 // h}" for h in GROUPS])
@pytest.mark.parametrize("q,n", SIZES, ids=[f"q{q}n{n}" for q, n in SIZES])
def test_attention_matches_reference(q, n, hkv, dtype):
    """Causal + left padding (different per batch row, the last row fully padded), GQA, mass and rows."""
    gen = _seed("attn", q, n, hkv, dtype)
    pads = [0, n // 3, n]  # row 2: nothing to attend (outputs, mass and rows must be zero)
    query, key, value, key_valid, query_valid = _inputs(gen, 3, 8, hkv, q, n, 16, 16, dtype, pads=pads)
    out, mass, rows = _check_against_reference(query, key, value, dtype=dtype, r=min(q, 4),
                                               key_valid=key_valid, query_valid=query_valid)
    assert (out[2] == 0).all() and (mass[2] == 0).all() and (rows[2] == 0).all()


def test_long_prompt_1000_tokens():
    gen = _seed("long")
    query, key, value, key_valid, query_valid = _inputs(gen, 2, 2, 1, 1000, 1000, 16, 16, torch.float32,
                                                        pads=[0, 37])
    _check_against_reference(query, key, value, dtype=torch.float32, r=16, key_valid=key_valid,
                             query_valid=query_valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d,dv", [(24, 24), (80, 80), (24, 40)])
def test_head_dims_not_powers_of_two(d, dv, dtype):
    gen = _seed("dims", d, dv, dtype)
    query, key, value, key_valid, query_valid = _inputs(gen, 2, 4, 2, 9, 33, d, dv, dtype, pads=[0, 5])
    _check_against_reference(query, key, value, dtype=dtype, r=2, key_valid=key_valid, query_valid=query_valid)


@pytest.mark.parametrize("q,n", [(1, 30), (12, 30)])
def test_per_head_key_validity(q, n):
    gen = _seed("per-head", q, n)
    query, key, value, key_valid, _ = _inputs(gen, 2, 8, 4, q, n, 16, 16, torch.float32, per_head=True)
    _check_against_reference(query, key, value, dtype=torch.float32, r=q, key_valid=key_valid)


@pytest.mark.parametrize("q,n", [(6, 20), (20, 20)])
def test_not_causal_no_masks(q, n):
    gen = _seed("noncausal", q, n)
    query, key, value, _, _ = _inputs(gen, 2, 4, 1, q, n, 16, 16, torch.float32)
    _check_against_reference(query, key, value, dtype=torch.float32, r=3, causal=False)


@pytest.mark.parametrize("need_mass,r", [(False, None), (False, 5), (True, None), (True, 0)])
def test_optional_statistics(need_mass, r):
    """Out only, rows only (r < q: the older queries are not needed), mass only, empty rows."""
    gen = _seed("optional", need_mass, r)
    query, key, value, key_valid, query_valid = _inputs(gen, 2, 4, 2, 21, 50, 16, 16, torch.float32, pads=[3, 30])
    _check_against_reference(query, key, value, dtype=torch.float32, r=r, need_mass=need_mass,
                             key_valid=key_valid, query_valid=query_valid)


def test_strided_inputs():
    """Non-contiguous query/key/value (the [b, tokens, heads, d] layout transposed, as transformers passes them)."""
    gen = _seed("strided")
    b, hq, hkv, q, n, d = 2, 4, 2, 6, 19, 16
    query = torch.randn(b, q, hq, d, generator=gen).transpose(1, 2)
    key = torch.randn(b, n, hkv, d, generator=gen).transpose(1, 2)
    value = torch.randn(b, n, hkv, 2 * d, generator=gen)[..., ::2].transpose(1, 2)
    key_valid = torch.ones(b, hkv, n, dtype=torch.bool)
    key_valid[1, :, :4] = False
    _check_against_reference(query, key, value, dtype=torch.float32, r=2, key_valid=key_valid[:, :1].expand(b, hkv, n))


def test_mask_and_dropout_are_refused():
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    kv = torch.randn(1, 2, 3, 16, device=DEVICE)
    with pytest.raises(TokenmemError, match="mask or dropout"):
        tk.attention_with_stats(q, kv, kv, scaling=0.25, mask=torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TokenmemError, match="mask or dropout"):
        tk.attention_with_stats(q, kv, kv, scaling=0.25, dropout=0.1)


def test_dispatcher_uses_triton_backend(monkeypatch):
    import tokenmem.kernels as kernels

    monkeypatch.setenv("TOKENMEM_KERNEL", "triton")
    gen = _seed("dispatch")
    q, k, v, key_valid, query_valid = _inputs(gen, 2, 4, 2, 3, 10, 16, 16, torch.float32, pads=[0, 2])
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    out, mass = kernels.attention_with_stats(dev(q), dev(k), dev(v), scaling=0.25, key_valid=dev(key_valid),
                                             query_valid=dev(query_valid), need_mass=True, chunk=2)
    want_out, want_mass = reference.attention_with_stats(q, k, v, scaling=0.25, key_valid=key_valid,
                                                         query_valid=query_valid, need_mass=True)
    assert _err(out.cpu(), want_out) < 1e-5 and _err(mass.cpu(), want_mass) < 1e-5
    # an extra mask goes to the reference backend, which accepts it
    mask = torch.ones(2, 1, 3, 10, dtype=torch.bool, device=DEVICE)
    kernels.attention_with_stats(dev(q), dev(k), dev(v), scaling=0.25, mask=mask)
    # compaction through the dispatcher
    buf = torch.randn(2, 2, 8, 3, device=DEVICE)
    want = buf.cpu().clone()
    index = torch.tensor([[[0, 2, 5], [1, 3, 7]]] * 2, device=DEVICE)
    kernels.compact_([buf], index)
    reference.compact_([want], index.cpu())
    assert torch.equal(buf.cpu(), want)


# --------------------------------------------------------------------------------------------- compact_


def _ascending_index(gen, b, h, n, k, keep_prefix=0):
    """index [b, h, k]: ascending slots < n, the first ``keep_prefix`` already in place."""
    rows = []
    for _ in range(b * h):
        rest = torch.randperm(n - keep_prefix, generator=gen)[: k - keep_prefix] + keep_prefix
        rows.append(torch.cat([torch.arange(keep_prefix), rest.sort().values]))
    return torch.stack(rows).view(b, h, k)


@pytest.mark.parametrize("n,k,keep_prefix", [(30, 12, 0), (200, 150, 40), (9, 9, 0), (5, 1, 0)])
def test_compact_matches_reference(n, k, keep_prefix):
    gen = _seed("compact", n, k, keep_prefix)
    b, h, cap = 2, 3, n + 7
    keys = torch.randn(b, h, cap, 24, generator=gen)  # float32 [b, h, cap, d]
    meta = torch.randint(0, 1 << 40, (b, h, cap, 6), generator=gen)  # int64 metadata
    state = torch.rand(b, h, cap, generator=gen) + 0.5  # float32 without trailing dims
    wide = torch.randn(b, h, cap, 8, 16, generator=gen).to(torch.bfloat16)  # two trailing dims, 128 wide
    half = torch.randn(b, h, cap, 5, generator=gen).to(torch.float16)
    # slots >= n are never sources: poison them (NaN / sentinel) to show they are not read
    for buf in (keys, state, wide, half):
        buf[:, :, n:] = float("nan")
    meta[:, :, n:] = -(1 << 62)
    index = _ascending_index(gen, b, h, n, k, keep_prefix)
    bufs = [keys, meta, state, wide, half]
    want = [t.clone() for t in bufs]
    reference.compact_(want, index)
    got = [t.to(DEVICE) for t in bufs]
    tk.compact_(got, index.to(DEVICE))
    for g_, w in zip(got, want):
        g_ = g_.cpu()
        assert torch.equal(g_[:, :, :k], w[:, :, :k])  # exact: compaction is a copy
        if g_.is_floating_point():
            assert torch.isfinite(g_[:, :, :k]).all()
            assert torch.equal(g_[:, :, k:].isnan(), w[:, :, k:].isnan())
            assert torch.equal(g_[:, :, k:].nan_to_num(), w[:, :, k:].nan_to_num())  # slots >= k untouched
        else:
            assert (g_[:, :, :k] >= 0).all()
            assert torch.equal(g_[:, :, k:], w[:, :, k:])


def test_compact_non_flattenable_trailing_dims():
    """Trailing dims that cannot be viewed as one (a transposed buffer) still compact in place."""
    gen = _seed("compact-strided")
    base = torch.randn(2, 2, 12, 4, 6, generator=gen)
    buf = base.transpose(3, 4)  # [2, 2, 12, 6, 4], not viewable as [2, 2, 12, 24]
    want = buf.clone()
    index = _ascending_index(gen, 2, 2, 10, 4)
    reference.compact_([want], index)
    dev_base = base.to(DEVICE)
    dev_buf = dev_base.transpose(3, 4)
    tk.compact_([dev_buf], index.to(DEVICE))
    assert torch.equal(dev_buf.cpu(), want)


def test_print_max_errors():
    """Runs last (file order): the worst normwise errors seen per dtype and tensor (shown with -s)."""
    print("\nmax relative errors:", {k: f"{v:.2e}" for k, v in sorted(MAX_ERR.items())})
