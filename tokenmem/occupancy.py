"""What a TokenMemory really holds, per layer and KV head, when heads keep different counts.

Threshold evictors (NAMM, ``ada``, ``pyramid``) and ``evict_unit="segment"`` let rows and KV heads keep different
counts; the memory keeps every layer's tensors rectangular (the largest count in every head) and *masks* the
surplus slots (flag ``PAD``), and a left-padded batch holds padding slots too. A layer's *slots* therefore
overstate what it holds. This module counts the valid tokens -- real tokens that attention sees -- and the bytes
of their keys and values; :meth:`tokenmem.TokenMemory.stats` reports them (``held``, ``held_per_head``,
``kv_bytes``) beside the slots (``held_slots``) and every allocated byte (``bytes``):

>>> from tokenmem.occupancy import held_tokens, occupancy
>>> held_tokens(memory)[0]          # [batch, kv_heads] valid tokens of layer 0
>>> occupancy(memory)["held_mean"]   # per layer, the mean over rows and heads
"""

from __future__ import annotations

import torch

from .meta import FLAGS, PAD


def layer_held(layer) -> torch.Tensor:
    """``[batch, kv_heads]`` long (on the CPU): the valid (not masked, not padding) tokens each head of one
    :class:`~tokenmem.layer.MemoryLayer` holds; ``[0, 0]`` for a layer that holds nothing yet."""
    if layer.key_buffer is None or not layer.held:
        return torch.zeros(0, 0, dtype=torch.long)
    return ((layer.packed_meta[..., FLAGS] & PAD) == 0).sum(-1).cpu()


def held_tokens(memory) -> list[torch.Tensor]:
    """Per layer, ``[batch, kv_heads]`` long: the valid (not masked, not padding) tokens each head holds."""
    return [layer_held(layer) for layer in memory.layers]


def token_bytes(layer) -> int:
    """Bytes of one token's key and value in one KV head of ``layer`` (0 before its first update)."""
    if layer.key_buffer is None:
        return 0
    k, v = layer.key_buffer, layer.value_buffer
    return k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size()


def allocated_bytes(layer) -> int:
    """Bytes of every buffer ``layer`` allocated (keys, values, metadata, evictor state, mass, rows)."""
    return sum(t.numel() * t.element_size() for t in layer.buffers())


def mean_count(counts: torch.Tensor) -> int | float:
    """The mean of ``counts`` (an int when it is whole; 0 for no counts)."""
    if not counts.numel():
        return 0
    mean = float(counts.double().mean())
    return int(mean) if mean.is_integer() else mean


def held_fraction(counts: list[torch.Tensor], seen: int, padding_seen: torch.Tensor | None = None) -> float:
    """Valid tokens held as a fraction of the real tokens seen, mean over layers: ``counts`` per layer ``[batch,
    kv_heads]`` (:func:`held_tokens`), ``seen`` tokens seen, ``padding_seen`` ``[batch]`` padding tokens each row has
    seen (``None``: none), which are not real tokens. 1.0 before any token."""
    if not seen or not counts:
        return 1.0
    if padding_seen is None:
        return sum(mean_count(c) for c in counts) / (len(counts) * seen)
    real = (seen - padding_seen).clamp(min=0)  # [batch]
    shares = [float(c.sum()) / (c.shape[1] * float(real.sum())) if c.numel() and int(real.sum()) else 1.0
              for c in counts]
    return sum(shares) / len(shares)


def count_range(values: list) -> str:
    """``"27"`` or ``"5-35"`` (one decimal for fractional means): the spread of per-layer counts."""
    low, high = (min(values), max(values)) if values else (0, 0)
    text = [str(x) if isinstance(x, int) else f"{x:.1f}" for x in (low, high)]
    return text[0] if low == high else f"{text[0]}-{text[1]}"


def occupancy(memory) -> dict:
    """Valid tokens and bytes, honestly, per layer: ``slots`` (allocated slots, as ``stats()["held_slots"]``),
    ``held`` as ``[batch][kv_heads]`` lists of valid tokens (as ``stats()["held_per_head"]``), ``held_mean`` /
    ``held_min`` / ``held_max``, ``masked`` (slots holding no valid token, padding included); and in all:
    ``bytes`` (every allocated buffer, as ``stats()["bytes"]``), ``kv_bytes_slots`` (keys and values of the
    held slots) and ``kv_bytes_valid`` (keys and values of the valid tokens only, as ``stats()["kv_bytes"]``)."""
    slots, held, mean, low, high, masked = [], [], [], [], [], []
    total = kv_slots = kv_valid = 0
    for layer in memory.layers:
        counts = layer_held(layer)
        slots.append(layer.held)
        total += allocated_bytes(layer)
        if not counts.numel():
            held.append([])
            mean.append(0.0), low.append(0), high.append(0), masked.append(0)
            continue
        b, h = counts.shape
        per_token = token_bytes(layer)
        held.append(counts.tolist())
        mean.append(float(counts.double().mean()))
        low.append(int(counts.min()))
        high.append(int(counts.max()))
        masked.append(int(b * h * layer.held - counts.sum()))
        kv_slots += b * h * layer.held * per_token
        kv_valid += int(counts.sum()) * per_token
    return {"slots": slots, "held": held, "held_mean": mean, "held_min": low, "held_max": high, "masked": masked,
            "bytes": total, "kv_bytes_slots": kv_slots, "kv_bytes_valid": kv_valid}
