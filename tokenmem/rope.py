"""Re-rotation of RoPE keys and queries (the ``shift`` position mode).

Rotary embeddings compose: rotating a vector rotated at position ``p`` by ``delta`` gives the vector
rotated at ``p + delta``. So a key cached at position ``p`` moves to slot position ``t`` by one rotation
of ``t - p``, without recomputing it (StreamingLLM, Xiao et al. 2023, assigns positions inside the
cache this way). The half-split layout (``rotate_half``) of Llama, Mistral and Qwen2 is assumed;
models with a partial rotary dimension rotate only the first ``2 * len(inv_freq)`` channels.
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
