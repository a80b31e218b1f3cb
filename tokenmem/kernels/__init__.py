"""Fused ops behind one dispatcher, chosen by the tensors' device.

Evictors and adapters never call a backend directly: the ``"tokenmem"`` attention function and the
memory's compaction go through :func:`attention_with_stats` and :func:`gather_tokens` here.
Backends: ``reference`` (plain torch, the specification; runs on every device).
"""

from __future__ import annotations

import os

import torch

from ..errors import TokenmemError
from . import reference

BACKENDS = {"reference": reference}
_DEFAULT_BY_DEVICE = {"cpu": "reference", "cuda": "reference", "mps": "reference", "xpu": "reference"}


def backend_for(device: torch.device) -> str:
    """The backend name used for tensors on ``device`` (``TOKENMEM_KERNEL`` overrides)."""
    forced = os.environ.get("TOKENMEM_KERNEL")
    if forced:
        if forced not in BACKENDS:
            raise TokenmemError(
                f"TOKENMEM_KERNEL={forced!r} is not a backend; available: {', '.join(BACKENDS)}. Unset it or pick one."
            )
        return forced
    name = _DEFAULT_BY_DEVICE.get(device.type)
    if name is None:
        raise TokenmemError(
            f"no tokenmem kernel backend for device type {device.type!r}; backends by device: "
            + ", ".join(f"{k} -> {v}" for k, v in _DEFAULT_BY_DEVICE.items())
        )
    return name


def attention_with_stats(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs):
    """Dispatch :func:`tokenmem.kernels.reference.attention_with_stats` (see there for the contract)."""
    return BACKENDS[backend_for(query.device)].attention_with_stats(query, key, value, **kwargs)


def gather_tokens(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Dispatch the token gather used by compaction."""
    return BACKENDS[backend_for(buffer.device)].gather_tokens(buffer, index)
