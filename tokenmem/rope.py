"""Re-rotation of RoPE keys and queries (the ``shift`` position mode).

Rotary embeddings compose: rotating a vector rotated at position ``p`` by ``delta`` gives the vector
rotated at ``p + delta``. So a key cached at position ``p`` moves to slot position ``t`` by one rotation
of ``t - p``, without recomputing it (StreamingLLM, Xiao et al. 2023, assigns positions inside the
cache this way). The half-split layout (``rotate_half``) of Llama, Mistral and Qwen2 is assumed;
models with a partial rotary dimension rotate only the first ``2 * len(inv_freq)`` channels. Multimodal
RoPE (Qwen2-VL's per-axis sections) is not re-rotated: a memory on such a model refuses ``shift``.
"""

from __future__ import annotations

import torch


def rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., n, d]`` by ``delta`` positions (``[..., n]``, broadcastable); fp32 math, x's dtype out."""
    rot_dim = 2 * inv_freq.shape[0]
    angle = delta.to(torch.float32)[..., None] * inv_freq.to(device=x.device, dtype=torch.float32)  # [..., n, r/2]
    cos, sin = angle.cos(), angle.sin()
    xr = x[..., :rot_dim].to(torch.float32)
    x1, x2 = xr[..., : rot_dim // 2], xr[..., rot_dim // 2 :]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rot_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rot_dim:]), dim=-1)


def rotate_to_slots(keys: torch.Tensor, rope: torch.Tensor, start: int, inv_freq: torch.Tensor) -> torch.Tensor | None:
    """Re-rotate cached keys to positions equal to their slots, in place.

    ``keys [b, h, m, d]`` and ``rope [b, h, m]`` (the positions they are rotated at now) are views of the
    slots ``start .. start + m - 1``; both are updated. Returns the rotation ``[b, h, m]`` applied, or None
    when every key was already in place."""
    target = torch.arange(start, start + keys.shape[2], device=rope.device)
    delta = target - rope
    if not bool((delta != 0).any()):
        return None
    keys[...] = rotate_by(keys, delta, inv_freq)
    rope[...] = target
    return delta


def shift_call(keys: torch.Tensor, rope: torch.Tensor, start: int, query: torch.Tensor,
               inv_freq: torch.Tensor) -> torch.Tensor:
    """``shift`` mode for a call's new tokens (slots ``start ..``, views as in :func:`rotate_to_slots`): their
    keys move to their slot positions and the call's queries ``[b, hq, q, d]`` with them; returns the queries."""
    delta = rotate_to_slots(keys, rope, start, inv_freq)
    if delta is not None:  # queries share their tokens' positions: the delta of the first KV head
        query = rotate_by(query, delta[:, :1], inv_freq)
    return query
