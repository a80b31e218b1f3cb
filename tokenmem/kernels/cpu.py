"""The CPU backend: attention statistics in two passes over key blocks, never ``n x n``.

Pass 1 gives the attention output and the row-wise log-sum-exp (LSE). Without padding it is
PyTorch's own fused flash-attention kernel for the CPU (``_scaled_dot_product_flash_attention_for_cpu``,
the kernel behind sdpa, which also returns the LSE); with a chunk of new queries after cached keys it
runs twice (cached keys, then the causal square of the new ones) and the halves are merged through
their LSEs. With padded keys, pass 1 is a blocked torch loop (LSE first, then the output from
``exp(s - lse)``). Pass 2 recomputes ``exp(s - lse)`` block by block (query block x key block) and
sums it into the per-key mass and the rows of the newest queries. Decoding and short chunks (whose
``q x n`` scores fit one query block x key block) take a direct path: one softmax, no second pass.

Without padding, pass 2 is a compiled kernel (:mod:`tokenmem.kernels.native`, ``colmass.cpp``, built with the
machine's C++ compiler at first use) that fuses ``q . k``, ``exp(s - lse)`` and the column sums tile by tile in
registers: one GEMM's worth of work, where a second flash call would do two. Without a compiler it is PyTorch's
fused kernel run on the transposed problem (see :func:`_mass_transposed`). Only the rows of the newest queries
(NAMM's window) take the blocked loop.
The two-pass / online-softmax structure follows FlashAttention (Dao et al. 2022, arXiv:2205.14135).
"""

from __future__ import annotations

import math

import torch

from ..errors import TokenmemError
from . import native

BLOCK_Q = 256
BLOCK_K = 1024
_NEG_INF = float("-inf")


def attention_with_stats(
    query: torch.Tensor,  # [b, hq, q, d]
    key: torch.Tensor,  # [b, hkv, n, d]
    value: torch.Tensor,  # [b, hkv, n, dv]
    *,
    scaling: float,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,  # bool [b, hkv | 1, n]
    query_valid: torch.Tensor | None = None,  # bool [b, q]
    mask: torch.Tensor | None = None,
    need_mass: bool = False,
    rows: torch.Tensor | None = None,  # float32 [b, hkv, r, n]
    dropout: float = 0.0,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`tokenmem.kernels.reference.attention_with_stats`."""
    if mask is not None or dropout > 0.0:
        raise TokenmemError("the cpu backend takes no extra mask or dropout; the dispatcher routes those to reference")
    q = query.shape[2]
    if q == 1 or q * key.shape[2] <= block_q * block_k:
        return _small(query, key, value, scaling, causal, key_valid, query_valid, need_mass, rows)
    if key_valid is None:  # no padding: fused kernels for everything
        out, lse = _flash(query, key, value, scaling, causal)
        mass = None
        if need_mass:
            mass = _mass_native(query, key, lse, scaling, causal, query_valid)
            if mass is None:  # no compiled kernel: flash on the transposed problem
                mass = _mass_transposed(query, key, lse, scaling, causal, query_valid)
            if mass is None:  # LSE spread beyond float32's exp range: the blocked pass is exact
                _, mass = _column_pass(query, key, value, lse, scaling, causal, None, query_valid,
                                       True, None, False, block_q, block_k)
        if rows is not None:  # only the newest r queries: one blocked pass over their rows
            r = rows.shape[2]
            qv = None if query_valid is None else query_valid[:, q - r :]
            _column_pass(query[:, :, q - r :], key, value, lse[:, :, q - r :], scaling, causal, None, qv,
                         False, rows, False, block_q, block_k)
        return out, mass
    lse = _lse_blocked(query, key, scaling, causal, key_valid, block_q, block_k)
    return _column_pass(query, key, value, lse, scaling, causal, key_valid, query_valid,
                        need_mass, rows, True, block_q, block_k)


# -- short chunks (decode) ---------------------------------------------------------------------
def _small(query, key, value, scaling, causal, key_valid, query_valid, need_mass, rows):
    """Decoding and short chunks (``q * n <= block_q * block_k``): the scores of every query fit in one block,
    so one softmax gives the output, the mass and the rows with no second pass (no per-call kernel overhead
    of the two-pass path, which dominates for a few new tokens over a short cache)."""
    b, hq, q, d = query.shape
    hkv, n, dv = key.shape[1], key.shape[2], value.shape[-1]
    g = hq // hkv
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    qg = query.reshape(b, hkv, g * q, d).to(compute)
    scores = torch.matmul(qg, key.to(compute).transpose(-1, -2)).mul_(scaling).view(b, hkv, g, q, n)
    if causal and q > 1:  # query i sees keys up to n - q + i
        hidden = torch.ones(q, q, dtype=torch.bool, device=query.device).triu_(1)
        scores[..., n - q :].masked_fill_(hidden, _NEG_INF)
    if key_valid is not None:
        scores.masked_fill_(~key_valid[:, :, None, None, :], _NEG_INF)
    probs = torch.softmax(scores, dim=-1)
    if key_valid is not None:
        probs = probs.nan_to_num_(0.0)  # a query with no visible key attends to nothing
    if query_valid is not None:
        probs.mul_(query_valid[:, None, None, :, None].to(compute))
    out = torch.matmul(probs.view(b, hkv, g * q, n), value.to(compute)).view(b, hq, q, dv).to(query.dtype)
    mass = None
    if need_mass or rows is not None:
        per_query = probs.mean(dim=2)  # [b, hkv, q, n]: mean over the group's query heads
        if rows is not None:
            rows.copy_(per_query[:, :, q - rows.shape[2] :])
        if need_mass:
            mass = per_query.sum(dim=2).to(torch.float32)
    return out, mass


# -- pass 1 -----------------------------------------------------------------------------------
def _flash(query, key, value, scaling, causal):
    """Output and LSE ``[b, hq, q]`` through PyTorch's fused CPU flash-attention kernel."""
    q, n = query.shape[2], key.shape[2]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    k, v = key, value  # the fused kernel groups query heads over KV heads itself (no repeat needed)
    if not causal or n == q:
        out, lse = flash(query, k, v, 0.0, causal and n == q, scale=scaling)
        return out, lse.to(torch.float32)
    # new queries after cached keys: cached part (fully visible) + causal square, merged by LSE
    out_past, lse_past = flash(query, k[:, :, : n - q], v[:, :, : n - q], 0.0, False, scale=scaling)
    out_new, lse_new = flash(query, k[:, :, n - q :], v[:, :, n - q :], 0.0, True, scale=scaling)
    lse = torch.logaddexp(lse_past.float(), lse_new.float())
    w_past = torch.exp(lse_past.float() - lse)[..., None]
    w_new = torch.exp(lse_new.float() - lse)[..., None]
    out = (out_past.float() * w_past + out_new.float() * w_new).to(query.dtype)
    return out, lse


def _mass_native(query, key, lse, scaling, causal, query_valid):
    """Per-key mass from the compiled fused kernel (:mod:`tokenmem.kernels.native`): ``exp(s - lse)`` summed
    over the queries tile by tile in registers, one GEMM's worth of work (flash does two). None for float64
    or when the kernel is not available."""
    if query.dtype == torch.float64:
        return None
    fn = native.load()
    if fn is None:
        return None
    if query_valid is not None:  # padded queries give no mass: exp(s - inf) = 0
        lse = torch.where(query_valid[:, None, :], lse, torch.full_like(lse, float("inf")))
    return native.colmass(query, key, lse, scaling, causal, fn=fn)


MAX_LSE_SPREAD = 60.0  # float32 exp() keeps ~87 of range: stay well inside it


def _scaled(o, big_l, c):
    """``o[..., 0] * exp(L - c)`` in the log domain (no inf * 0)."""
    return torch.exp(torch.log(o[..., 0].clamp_min(0.0)) + big_l.to(o.dtype) - c)


def _mass_transposed(query, key, lse, scaling, causal, query_valid):
    """Per-key mass with the fused flash kernel run on the transposed problem.

    ``mass_j = sum_i exp(s_ij - lse_i)``: with the keys as queries, the queries as keys and values
    ``v_i = exp(c - lse_i)`` in one channel, flash returns ``o_j = sum_i e^{s_ij} v_i / sum_i e^{s_ij}``
    and ``L_j = log sum_i e^{s_ij}``, so ``mass_j = o_j e^{L_j - c}``. Key ``j`` hears from queries
    ``i >= j`` (anti-causal): both sequences are reversed so that flash's causal mask applies.
    Returns None when the queries' LSE spread exceeds :data:`MAX_LSE_SPREAD` (``exp(c - lse)`` would
    underflow in float32); the caller then takes the blocked pass.
    """
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g = hq // hkv
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    qc = query.to(compute)
    kc = (key.repeat_interleave(g, dim=1) if g > 1 else key).to(compute)
    lse = lse.to(compute)
    if query_valid is not None:  # padded queries give no mass
        lse = torch.where(query_valid[:, None, :], lse, torch.full_like(lse, float("inf")))
    finite = torch.isfinite(lse)
    c = torch.where(finite, lse, torch.full_like(lse, float("inf"))).amin(dim=-1, keepdim=True)
    top = torch.where(finite, lse, torch.full_like(lse, float("-inf"))).amax(dim=-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    if compute == torch.float32 and bool(((top - c) > MAX_LSE_SPREAD).any()):
        return None  # exp(c - lse) would underflow for some queries
    v = torch.zeros(b, hq, q, d, dtype=compute, device=query.device)
    v[..., 0] = torch.exp(c - lse)  # [b, hq, q]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    parts = []
    if not causal:
        o, big_l = flash(kc, qc, v, 0.0, False, scale=scaling)
        parts.append(_scaled(o, big_l, c))
    else:
        if n > q:  # cached keys hear from every query of the call
            o, big_l = flash(kc[:, :, : n - q], qc, v, 0.0, False, scale=scaling)
            parts.append(_scaled(o, big_l, c))
        o, big_l = flash(kc[:, :, n - q :].flip(2), qc.flip(2), v.flip(2), 0.0, True, scale=scaling)
        parts.append(_scaled(o, big_l, c).flip(-1))
    mass = torch.cat(parts, dim=-1).view(b, hkv, g, n).mean(dim=2)
    return mass.to(torch.float32)


def _block_scores(qb, key, t, u, scaling, causal, key_valid, s, e, offset, compute):
    """Scores ``[b, hkv, g, c, kb]`` of query block ``s:e`` against key block ``t:u`` (masked)."""
    b, hkv, g, c, d = qb.shape
    kb = key[:, :, t:u].to(compute)
    sc = torch.matmul(qb.reshape(b, hkv, g * c, d), kb.transpose(-1, -2)).view(b, hkv, g, c, u - t)
    sc.mul_(scaling)
    if causal and u - 1 > s + offset:  # the block reaches past some query's diagonal
        allowed = torch.arange(t, u, device=qb.device)[None, :] <= (torch.arange(s, e, device=qb.device) + offset)[:, None]
        sc.masked_fill_(~allowed, _NEG_INF)
    if key_valid is not None:
        sc.masked_fill_(~key_valid[:, :, None, None, t:u], _NEG_INF)
    return sc


def _key_blocks(n, s, e, offset, causal, block_k):
    stop = min(n, e - 1 + offset + 1) if causal else n
    return [(t, min(t + block_k, stop)) for t in range(0, stop, block_k)]


def _lse_blocked(query, key, scaling, causal, key_valid, block_q, block_k):
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g = hq // hkv
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    qg = query.reshape(b, hkv, g, q, d)
    offset = n - q
    lse = torch.full((b, hkv, g, q), _NEG_INF, dtype=compute, device=query.device)
    for s in range(0, q, block_q):
        e = min(q, s + block_q)
        qb = qg[:, :, :, s:e].to(compute)
        acc = lse[:, :, :, s:e]
        for t, u in _key_blocks(n, s, e, offset, causal, block_k):
            sc = _block_scores(qb, key, t, u, scaling, causal, key_valid, s, e, offset, compute)
            acc = torch.logaddexp(acc, torch.logsumexp(sc, dim=-1))
        lse[:, :, :, s:e] = acc
    return lse.view(b, hq, q)


# -- pass 2 -----------------------------------------------------------------------------------
def _column_pass(query, key, value, lse, scaling, causal, key_valid, query_valid, need_mass, rows, need_out,
                 block_q, block_k):
    b, hq, q, d = query.shape
    hkv, n, dv = key.shape[1], key.shape[2], value.shape[-1]
    g = hq // hkv
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    qg = query.reshape(b, hkv, g, q, d)
    # rows with no admissible key have lse = -inf: make exp(s - lse) = 0 there instead of NaN
    lse_g = lse.reshape(b, hkv, g, q).to(compute)
    lse_g = torch.where(torch.isinf(lse_g), torch.full_like(lse_g, float("inf")), lse_g)
    offset = n - q
    mass = torch.zeros(b, hkv, n, dtype=compute, device=query.device) if need_mass else None
    out = torch.zeros(b, hkv, g, q, dv, dtype=compute, device=query.device) if need_out else None
    r = rows.shape[2] if rows is not None else 0
    if rows is not None:
        rows.zero_()
    qv = query_valid.to(compute) if query_valid is not None else None
    for s in range(0, q, block_q):
        e = min(q, s + block_q)
        qb = qg[:, :, :, s:e].to(compute)
        lb = lse_g[:, :, :, s:e, None]
        for t, u in _key_blocks(n, s, e, offset, causal, block_k):
            p = _block_scores(qb, key, t, u, scaling, causal, key_valid, s, e, offset, compute)
            p.sub_(lb).exp_()  # [b, hkv, g, c, kb]
            if out is not None:
                out[:, :, :, s:e] += torch.matmul(p, value[:, :, None, t:u].to(compute))
            if mass is None and rows is None:
                continue
            if qv is not None:
                p.mul_(qv[:, None, None, s:e, None])
            if mass is not None:
                mass[:, :, t:u] += p.sum(dim=(2, 3))
            lo = max(s, q - r)
            if rows is not None and lo < e:
                rows[:, :, lo - (q - r) : e - (q - r), t:u] = p[:, :, :, lo - s :].mean(dim=2).to(rows.dtype)
    if mass is not None and g > 1:
        mass /= g
    if out is not None:
        out = out.view(b, hq, q, dv).to(query.dtype)
    return out, (mass.to(torch.float32) if mass is not None else None)


# -- compaction -------------------------------------------------------------------------------
COMPACT_BLOCK = 512  # minimum rows per block
COMPACT_BLOCK_BYTES = 4 << 20  # a block's temporary holds at most about this much (or COMPACT_BLOCK rows)


def compact_(buffers: list[torch.Tensor], index: torch.Tensor, block: int | None = None) -> None:
    """In-place compaction: slot ``index[b, h, j]`` -> slot ``j``, walking ``j`` in ascending blocks.

    Safe in place because ``index`` is ascending (``index[j] >= j``): a block's sources are read into a
    block-sized temporary before its slots are written, and later blocks only read slots past it.
    A contiguous buffer is read as rows ``[b * h * capacity, ...]`` with one ``index_select`` per block
    (3-10x faster than ``gather`` with an expanded index); other buffers use ``gather``. ``block``: rows
    per block (default: as many as fit in ``COMPACT_BLOCK_BYTES``, at least ``COMPACT_BLOCK``).
    """
    b, h, k = index.shape
    base = None
    for buffer in buffers:
        trailing = buffer.shape[3:]
        row_bytes = max(1, b * h * math.prod(trailing) * buffer.element_size())
        rows = block if block is not None else max(COMPACT_BLOCK, COMPACT_BLOCK_BYTES // row_bytes)
        if buffer.is_contiguous():
            cap = buffer.shape[2]
            if base is None or base[1] != cap:
                base = ((torch.arange(b * h, dtype=index.dtype, device=index.device) * cap).view(b, h, 1), cap)
            flat = buffer.view(b * h * cap, *trailing)
            for j in range(0, k, rows):
                idx = index[:, :, j : j + rows]
                n = idx.shape[2]
                picked = flat.index_select(0, (idx + base[0]).reshape(-1))
                buffer[:, :, j : j + n] = picked.view(b, h, n, *trailing)
            continue
        for j in range(0, k, rows):
            idx = index[:, :, j : j + rows]
            idx = idx.view(*idx.shape, *([1] * len(trailing))).expand(*idx.shape, *trailing)
            buffer[:, :, j : j + idx.shape[2]] = torch.gather(buffer, 2, idx)
