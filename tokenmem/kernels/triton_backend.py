"""Triton backend: the contract of :mod:`tokenmem.kernels.reference` as GPU kernels.

Attention with statistics is computed in two passes with float32 accumulation and no ``q x n``
buffer, following the tiled online softmax of FlashAttention (Dao et al., 2022, "FlashAttention:
Fast and Memory-Efficient Exact Attention with IO-Awareness") and FlashAttention-2 (Dao, 2023,
"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"), whose
backward pass is the model for the second pass (recompute ``p = exp(s - lse)`` from the stored
log-sum-exp instead of materialising ``p``):

1. ``_attn_fwd_kernel``, grid ``(batch * query heads, query blocks)``: one program owns
   ``BLOCK_M`` queries of one query head, walks the key blocks up to its causal limit with the
   online softmax (running max ``m``, running sum ``l``, rescaled accumulator), writes the output
   (query dtype; queries with no admissible key get 0) and the row log-sum-exp ``lse [b, hq, q]``
   (float32, base 2, ``+inf`` for rows with no admissible key so that they get ``p = 0`` below).
2. ``_attn_stats_kernel``, grid ``(batch * KV heads, key blocks)``, only when ``need_mass`` or
   ``rows`` is asked for: one program owns ``BLOCK_N`` keys of one KV head, loads them once, walks
   the query blocks that can see them (plus the newest ``r`` queries when ``rows`` is given, whose
   invisible entries must be written as 0) and, for each, the ``g`` query heads of the group:
   ``p = exp2(s - lse)`` (masked by causality, ``key_valid``, ``query_valid``). It sums ``p`` over
   the group and the queries into the column mass of its keys and writes the newest ``r`` rows
   (group sum / ``g``) into ``rows``. Every program owns its keys, so there are no atomics and the
   result is deterministic.

Decode (``q == 1``) uses the same two kernels with the smallest query block ``tl.dot`` accepts
(16 rows, 15 of them masked).

``compact_`` is one ``_compact_kernel`` launch per buffer, one program per ``(b * h, trailing
chunk)``, that walks the destination slots ``j`` in ascending blocks, loads the block's sources
``index[j]``, synchronises the program (``tl.debug_barrier``) and only then stores. That is safe in
place because ``index`` is ascending with ``index[j] >= j``: the sources of a block are at or after
its first slot and the sources of later blocks lie at or after their own first slot, beyond
everything this block writes. Buffers are copied as raw bits (viewed as an integer type of the
same size), so any dtype works and NaN payloads survive.

Block sizes (untuned): query block 64 (``next_pow2(q)`` with a floor of 16 when ``q < 64``), key
block 64 (32 for head dims above 128), the head dim padded to a power of two (floor 16) and
masked, so head dims like 24 or 80 work.

What is verified, and what is not:

* Correctness was checked only with the Triton interpreter (``TRITON_INTERPRET=1``) on CPU
  tensors, against the reference, by ``tests/test_kernels_triton.py`` (float32, bfloat16, float16; GQA groups
  1/2/4/8; causal with left padding; odd sizes up to 1000 tokens; head dims 24/80). The interpreter
  does not emulate GPU memory ordering, warp scheduling, ``tf32`` or compiler-specific numerics.
* The interpreter cannot run ``tl.dot`` on bfloat16 (it multiplies the raw bit patterns; see
  triton-lang/triton#11584 and the interpreter notes in Triton's debugging guide), so under the
  interpreter bfloat16 operands are upcast to float32 before every ``tl.dot`` (exact: bfloat16
  products are exact in float32). The native bfloat16 ``tl.dot`` path (with ``p`` rounded to the
  value dtype before ``p @ v``, as in FlashAttention) therefore runs only on a GPU and is unverified.
  The interpreter also rounds float32 -> bfloat16 conversions toward zero where the GPU rounds to
  nearest even, so the bfloat16 outputs seen in the tests carry up to 1 ulp (2^-7 relative) of
  interpreter truncation error instead of half an ulp.
* Nothing was compiled for or run on a real GPU: compilation by the NVIDIA/AMD backends, register
  and shared-memory pressure of the chosen blocks, the in-place safety of ``compact_`` under real
  concurrency, and all performance (throughput, memory traffic, the cost of the second pass, the
  16-row query block for decode, block sizes, ``num_warps``/``num_stages``) remain unmeasured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import TokenmemError

#: logits are kept in base 2 (``exp2``/``log2``): ``s * scaling * log2(e)``.
_LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    # float32 operands need exact IEEE products: the NVIDIA default for float32 tl.dot is tf32
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, KV_VALID, OUT, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sfb, sfh, sfn,
    sob, soh, som, sod,
    hq, g, q_len, n, offset, qk_scale, D, DV,
    CAUSAL: tl.constexpr, HAS_KV_VALID: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // hq).to(tl.int64)
    h = (pid_bh % hq).to(tl.int64)
    kvh = h // g

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < q_len
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd
    qb = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        qb = qb.to(tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    hi = n
    if CAUSAL:  # the last query of the block sees keys j <= offset + its index
        hi = tl.minimum(n, offset + (pid_m + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n
        kt = tl.load(k_base + offs_d[:, None] * skd + offs_n[None, :].to(tl.int64) * skn,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = _mm(qb, kt, IEEE) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
        ok = n_ok[None, :] & m_ok[:, None]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offset + offs_m[:, None])
        if HAS_KV_VALID:
            kv = tl.load(KV_VALID + b * sfb + kvh * sfh + offs_n * sfn, mask=n_ok, other=0)
            ok = ok & (kv != 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: avoid inf - inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn + offs_dv[None, :] * svd,
                     mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        if DOT_FP32:
            pv = _mm(p, vb.to(tl.float32), IEEE)
        else:
            pv = _mm(p.to(vb.dtype), vb, IEEE)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]  # rows with no admissible key: acc = 0 -> out = 0
    o_ptrs = OUT + b * sob + h * soh + offs_m[:, None].to(tl.int64) * som + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    if STORE_LSE:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_stats_kernel(
    Q, K, KV_VALID, Q_VALID, LSE, MASS, ROWS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    sfb, sfh, sfn,
    sgb, sgm,
    smb, smh, smn,
    srb, srh, srm, srn,
    hq, hkv, g, q_len, n, offset, qk_scale, inv_g, r, D,
    CAUSAL: tl.constexpr, HAS_KV_VALID: tl.constexpr, HAS_Q_VALID: tl.constexpr,
    NEED_MASS: tl.constexpr, HAS_ROWS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // hkv).to(tl.int64)
    kvh = (pid_bh % hkv).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < n
    d_ok = offs_d < D
    kt = tl.load(K + b * skb + kvh * skh + offs_d[:, None] * skd + offs_n[None, :].to(tl.int64) * skn,
                 mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    if DOT_FP32:
        kt = kt.to(tl.float32)
    key_ok = n_ok
    if HAS_KV_VALID:
        kv = tl.load(KV_VALID + b * sfb + kvh * sfh + offs_n * sfn, mask=n_ok, other=0)
        key_ok = key_ok & (kv != 0)

    # first query to visit: the first one that sees this block (mass), or the first of the newest r
    # queries (rows: their entries for invisible keys are written as 0)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0)
    rows_lo = q_len - r
    if HAS_ROWS:
        if NEED_MASS:
            lo = tl.minimum(lo, rows_lo)
        else:
            lo = rows_lo
    lo = (lo // BLOCK_M) * BLOCK_M

    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(lo, q_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        ok = m_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offset + offs_m[:, None])
        if HAS_Q_VALID:
            qv = tl.load(Q_VALID + b * sgb + offs_m * sgm, mask=m_ok, other=0)
            ok = ok & (qv != 0)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for gh in range(0, g):
            h = kvh * g + gh
            qb = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                qb = qb.to(tl.float32)
            s = _mm(qb, kt, IEEE) * qk_scale
            lse = tl.load(LSE + (b * hq + h) * q_len + offs_m, mask=m_ok, other=float("inf"))
            s = tl.where(ok, s, float("-inf"))
            acc += tl.exp2(s - lse[:, None])  # -inf - lse and s - (+inf) both give 0
        if NEED_MASS:
            mass += tl.sum(acc, axis=0)
        if HAS_ROWS:
            row = offs_m - rows_lo
            r_ptrs = ROWS + b * srb + kvh * srh + row[:, None].to(tl.int64) * srm + offs_n[None, :] * srn
            tl.store(r_ptrs, acc * inv_g, mask=(m_ok & (row >= 0))[:, None] & n_ok[None, :])
    if NEED_MASS:
        tl.store(MASS + b * smb + kvh * smh + offs_n * smn, mass * inv_g, mask=n_ok)


@triton.jit
def _compact_kernel(
    BUF, IDX, h, k, T,
    sb, sh, ss, st,
    sib, sih, sij,
    BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_t = tl.program_id(1)
    bb = (pid // h).to(tl.int64)
    hh = (pid % h).to(tl.int64)
    base = BUF + bb * sb + hh * sh
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    for j0 in range(0, k, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < k
        src = tl.load(IDX + bb * sib + hh * sih + offs_j * sij, mask=j_ok, other=0).to(tl.int64)
        dst = offs_j.to(tl.int64)
        move = (j_ok & (src != dst))[:, None] & t_ok[None, :]  # slots already in place are skipped
        vals = tl.load(base + src[:, None] * ss + offs_t[None, :] * st, mask=move)
        tl.debug_barrier()  # every source of this block is read before any thread overwrites a slot
        tl.store(base + dst[:, None] * ss + offs_t[None, :] * st, vals, mask=move)


_INTERPRETED = type(_attn_fwd_kernel).__name__ == "InterpretedFunction"
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type == "cpu" and not _INTERPRETED:
        raise TokenmemError(
            f"{what}: the triton backend runs on GPU tensors, got CPU tensors. Move the tensors to a GPU, "
            "use the 'cpu' or 'reference' backend (TOKENMEM_KERNEL=cpu / reference), or set "
            "TRITON_INTERPRET=1 before triton is imported to run the kernels in Triton's (slow) interpreter"
        )


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(1, int(x))))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 (same storage); other masks as they are."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def attention_with_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    need_mass: bool = False,
    rows: torch.Tensor | None = None,
    dropout: float = 0.0,
    **_ignored,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`tokenmem.kernels.reference.attention_with_stats` (without ``mask``/``dropout``)."""
    if mask is not None or dropout > 0.0:
        raise TokenmemError(
            "attention_with_stats: the triton backend does not take an extra mask or dropout; call "
            "tokenmem.kernels.attention_with_stats (the dispatcher sends those calls to the reference backend)"
        )
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TokenmemError(
            f"attention_with_stats: the triton backend supports float32, bfloat16 and float16, got {query.dtype}; "
            "use TOKENMEM_KERNEL=reference for other dtypes"
        )
    _check_device(query, "attention_with_stats")
    b, hq, q, d = query.shape
    hkv, n, dv = key.shape[1], key.shape[2], value.shape[-1]
    g = hq // hkv
    dev = query.device
    out = torch.empty(b, hq, q, dv, dtype=query.dtype, device=dev)
    has_rows = rows is not None and rows.numel() > 0
    stats = need_mass or has_rows
    if b * hq * q == 0 or n == 0:
        out.zero_()
        mass = torch.zeros(b, hkv, n, dtype=torch.float32, device=dev) if need_mass else None
        return out, mass

    dot_fp32 = _INTERPRETED and query.dtype == torch.bfloat16  # interpreter: no bf16 tl.dot
    ieee = query.dtype == torch.float32 or dot_fp32
    block_d, block_dv = _pow2(d), _pow2(dv)
    block_m = 64 if q >= 64 else _pow2(q)
    block_n = 64 if max(block_d, block_dv) <= 128 else 32
    qk_scale = float(scaling) * _LOG2E
    offset = n - q

    kv = _bits(key_valid) if key_valid is not None else None
    kv_strides = (kv.stride(0), kv.stride(1) if kv.shape[1] > 1 else 0, kv.stride(2)) if kv is not None else (0, 0, 0)
    kv_arg = kv if kv is not None else query
    lse = torch.empty(b * hq, q, dtype=torch.float32, device=dev) if stats else out

    _attn_fwd_kernel[(b * hq, triton.cdiv(q, block_m))](
        query, key, value, kv_arg, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *kv_strides, *out.stride(),
        hq, g, q, n, offset, qk_scale, d, dv,
        CAUSAL=bool(causal), HAS_KV_VALID=kv is not None, STORE_LSE=stats, DOT_FP32=dot_fp32, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=4,
    )
    if not stats:
        return out, None

    mass = torch.empty(b, hkv, n, dtype=torch.float32, device=dev) if need_mass else None
    qv = _bits(query_valid) if query_valid is not None else None
    rows_arg = rows if has_rows else lse
    _attn_stats_kernel[(b * hkv, triton.cdiv(n, block_n))](
        query, key, kv_arg, qv if qv is not None else query, lse,
        mass if mass is not None else lse, rows_arg,
        *query.stride(), *key.stride(), *kv_strides,
        *(qv.stride() if qv is not None else (0, 0)),
        *(mass.stride() if mass is not None else (0, 0, 0)),
        *(rows.stride() if has_rows else (0, 0, 0, 0)),
        hq, hkv, g, q, n, offset, qk_scale, 1.0 / g, rows.shape[2] if has_rows else 0, d,
        CAUSAL=bool(causal), HAS_KV_VALID=kv is not None, HAS_Q_VALID=qv is not None,
        NEED_MASS=bool(need_mass), HAS_ROWS=has_rows, DOT_FP32=dot_fp32, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return out, mass


def compact_(buffers: list[torch.Tensor], index: torch.Tensor) -> None:
    """Same contract as :func:`tokenmem.kernels.reference.compact_`: for every ``buffer [b, h, capacity, ...]``
    write slot ``index[b, h, j]`` into slot ``j`` for ``j < k``, in place (``index [b, h, k]`` ascending,
    so ``index[b, h, j] >= j``). Slots ``>= k`` are left as they are."""
    if not buffers:
        return
    _check_device(index, "compact_")
    bsz, heads, k = index.shape
    if bsz * heads * k == 0:
        return
    for buf in buffers:
        cap = buf.shape[2]
        if k > cap:
            raise TokenmemError(f"compact_: index keeps {k} slots but the buffer {tuple(buf.shape)} has {cap}")
        if buf.numel() == 0:
            continue
        try:
            flat = buf.view(bsz, heads, cap, -1)  # trailing dims as one (a view: writes land in buf)
        except RuntimeError:
            flat = None
        if flat is None or buf.element_size() not in _INT_VIEW:
            from . import reference  # trailing dims that cannot be flattened without a copy

            reference.compact_([buf], index)
            continue
        flat = flat.view(_INT_VIEW[buf.element_size()])  # a bit copy: any dtype, NaN payloads kept
        t = flat.shape[3]
        block_t = min(_pow2(t, floor=1), 128)
        block_j = min(max(4096 // block_t, 16), _pow2(k), 1024)
        _compact_kernel[(bsz * heads, triton.cdiv(t, block_t))](
            flat, index, heads, k, t, *flat.stride(), *index.stride(),
            BLOCK_J=block_j, BLOCK_T=block_t, num_warps=4,
        )
