"""The plain-torch specification of the attention statistics every backend must reproduce.

``attention_with_stats`` computes ordinary scaled-dot-product attention (GQA by grouping query
heads over KV heads, causal + key-validity + optional extra masks) and, on request, the attention
*mass* each stored key received in this call: the sum over this call's (valid) queries of the softmax
weights, averaged over the query heads of a KV head's group. Queries are processed in chunks, so the
largest buffer is ``chunk x keys``, never ``queries x keys`` for long prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Upper bound on the elements of one score block (batch x query heads x chunk x keys).
BLOCK_ELEMENTS = 1 << 23


def _chunk_size(batch: int, heads: int, queries: int, keys: int) -> int:
    return max(1, min(queries, BLOCK_ELEMENTS // max(1, batch * heads * keys)))


def attention_with_stats(
    query: torch.Tensor,  # [b, hq, q, d]
    key: torch.Tensor,  # [b, hkv, n, d]
    value: torch.Tensor,  # [b, hkv, n, dv]
    *,
    scaling: float,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,  # bool [b, hkv | 1, n]
    query_valid: torch.Tensor | None = None,  # bool [b, q]
    mask: torch.Tensor | None = None,  # [b, 1 | hq, q, n]: bool (True = attend) or additive float
    need_mass: bool = False,
    rows: torch.Tensor | None = None,  # float32 [b, hkv, r, n], r <= q: filled with the newest r rows
    dropout: float = 0.0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention output ``[b, hq, q, dv]`` (query dtype) and key mass ``[b, hkv, n]`` (float32) or None.

    Causality is by cache slot: query ``i`` (of the ``q`` newest tokens, which occupy the last ``q``
    key slots) attends to key slots ``j <= n - q + i``. Queries with no admissible key (padding) give a
    zero output and contribute no mass; ``query_valid`` additionally removes padded queries from the
    mass and zeroes their rows. The mass of key ``j`` is ``sum_i p[h, i, j]`` over this call's valid
    queries ``i``, averaged over the query heads ``h`` of the key's group. ``rows`` (when given) receives
    the attention rows ``p[i, :]`` of the newest ``r`` queries, averaged over the group's query heads.
    """
    b, hq, q, d = query.shape
    hkv, n, dv = key.shape[1], key.shape[2], value.shape[-1]
    g = hq // hkv
    compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    k_t = key.to(compute).transpose(-1, -2)  # [b, hkv, d, n]
    v = value.to(compute)  # [b, hkv, n, dv]
    q_grouped = query.reshape(b, hkv, g, q, d)
    offset = n - q
    size = chunk or _chunk_size(b, hq, q, n)

    extra = None
    if mask is not None:  # [b, 1|hq, q, n] -> [b, 1|hkv, 1|g, q, n]
        mh = mask.shape[1]
        extra = mask.reshape(mask.shape[0], 1, 1, q, n) if mh == 1 else mask.reshape(mask.shape[0], hkv, g, q, n)
    kv_ok = key_valid[:, :, None, None, :] if key_valid is not None else None  # [b, hkv|1, 1, 1, n]
    key_index = torch.arange(n, device=query.device)

    out = torch.empty(b, hkv, g, q, dv, dtype=compute, device=query.device)
    mass = torch.zeros(b, hkv, n, dtype=torch.float32, device=query.device) if need_mass else None
    for s in range(0, q, size):
        e = min(q, s + size)
        c = e - s
        scores = torch.matmul(q_grouped[:, :, :, s:e].to(compute).reshape(b, hkv, g * c, d), k_t)
        scores = scores.view(b, hkv, g, c, n).mul_(scaling)  # [b, hkv, g, c, n]
        may_be_empty = False
        if extra is not None:
            block = extra[..., s:e, :]
            if block.dtype == torch.bool:
                scores.masked_fill_(~block, float("-inf"))
                may_be_empty = True
            else:
                scores.add_(block.to(compute))
        if causal and s + offset < n - 1:  # some query in the block cannot see the last keys
            allowed = key_index[None, :] <= (torch.arange(s, e, device=query.device) + offset)[:, None]  # [c, n]
            scores.masked_fill_(~allowed, float("-inf"))
            may_be_empty = may_be_empty or offset + s < 0
        if kv_ok is not None:
            scores.masked_fill_(~kv_ok, float("-inf"))
            may_be_empty = True
        probs = torch.softmax(scores, dim=-1)
        if may_be_empty:  # rows with no admissible key: softmax gives NaN, define them as zero
            probs = probs.nan_to_num_(0.0)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout, training=True)
        out[:, :, :, s:e] = torch.matmul(probs.view(b, hkv, g * c, n), v).view(b, hkv, g, c, dv)
        if mass is not None or rows is not None:
            if query_valid is not None:
                probs = probs * query_valid[:, None, None, s:e, None].to(compute)
            if mass is not None:
                mass += probs.sum(dim=(2, 3)).to(torch.float32)
            if rows is not None:
                r = rows.shape[2]
                lo = max(s, q - r)
                if lo < e:
                    rows[:, :, lo - (q - r) : e - (q - r)] = probs[:, :, :, lo - s :].mean(dim=2).to(rows.dtype)
    if mass is not None and g > 1:
        mass /= g
    return out.view(b, hq, q, dv).to(query.dtype), mass


def gather_tokens(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select tokens along dim 2 of ``buffer [b, h, n, ...]`` with ``index [b, h, k]`` (any trailing dims)."""
    idx = index.view(*index.shape, *([1] * (buffer.dim() - 3))).expand(*index.shape, *buffer.shape[3:])
    return torch.gather(buffer, 2, idx)


def compact_(buffers: list[torch.Tensor], index: torch.Tensor) -> None:
    """Compaction, in place: for every ``buffer [b, h, capacity, ...]`` write slot ``index[b, h, j]`` to
    slot ``j`` for ``j < k`` (``index [b, h, k]`` ascending). Slots ``>= k`` are left as they are."""
    n = int(index.max()) + 1 if index.numel() else 0
    k = index.shape[-1]
    for buffer in buffers:
        buffer[:, :, :k] = gather_tokens(buffer[:, :, :n], index)
