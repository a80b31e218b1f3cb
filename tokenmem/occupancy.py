"""What a TokenMemory really holds, per layer and KV head, when heads keep different counts.

Threshold evictors (NAMM, ``ada``, ``pyramid``) and ``evict_unit="segment"`` let rows and KV heads keep different
counts; the memory keeps every layer's tensors rectangular (the largest count in every head) and *masks* the
surplus slots (flag ``PAD``), so ``TokenMemory.stats()["held"]`` (slots per layer) counts masked slots and
left padding as held. This module counts the valid tokens -- real tokens that attention sees -- instead:

>>> from tokenmem.occupancy import held_tokens, occupancy
>>> held_tokens(memory)[0]          # [batch, kv_heads] valid tokens of layer 0
>>> occupancy(memory)["held_mean"]   # per layer, the mean over rows and heads
"""

from __future__ import annotations

import torch


def held_tokens(memory) -> list[torch.Tensor]:
    """Per layer, ``[batch, kv_heads]`` long: the valid (not masked, not padding) tokens each head holds."""
    out = []
    for layer in memory.layers:
        if layer._k is None or not layer.held:
            out.append(torch.zeros(0, 0, dtype=torch.long))
            continue
        out.append(layer.meta.valid.sum(-1).cpu())
    return out


def occupancy(memory) -> dict:
    """Valid tokens and bytes, honestly: ``slots`` per layer (what ``stats()["held"]`` reports), ``held`` per layer
    as ``[batch][kv_heads]`` lists of valid tokens, ``held_mean`` / ``held_min`` / ``held_max`` per layer,
    ``masked`` per layer (slots holding no valid token, padding included), ``bytes`` (every allocated buffer, as
    ``stats()["bytes"]``), ``kv_bytes_slots`` (keys and values of the held slots, as ``stats()["kv_bytes"]``) and
    ``kv_bytes_valid`` (keys and values of the valid tokens only)."""
    slots, held, mean, low, high, masked = [], [], [], [], [], []
    total = kv_slots = kv_valid = 0
    for layer, counts in zip(memory.layers, held_tokens(memory)):
        slots.append(layer.held)
        if layer._k is None:
            held.append([])
            mean.append(0.0), low.append(0), high.append(0), masked.append(0)
            continue
        b, h = layer._k.shape[:2]
        per_token = layer._k.shape[-1] * layer._k.element_size() + layer._v.shape[-1] * layer._v.element_size()
        held.append(counts.tolist())
        mean.append(float(counts.float().mean()) if counts.numel() else 0.0)
        low.append(int(counts.min()) if counts.numel() else 0)
        high.append(int(counts.max()) if counts.numel() else 0)
        masked.append(int(b * h * layer.held - counts.sum()))
        total += sum(t.numel() * t.element_size() for t in layer.buffers())
        kv_slots += b * h * layer.held * per_token
        kv_valid += int(counts.sum()) * per_token
    return {"slots": slots, "held": held, "held_mean": mean, "held_min": low, "held_max": high, "masked": masked,
            "bytes": total, "kv_bytes_slots": kv_slots, "kv_bytes_valid": kv_valid}
