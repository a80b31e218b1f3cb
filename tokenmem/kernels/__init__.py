"""Fused ops behind one dispatcher, chosen by the tensors' device.

Evictors and adapters never call a backend directly: the ``"tokenmem"`` attention function and the
memory's compaction go through :func:`attention_with_stats` and :func:`compact_` here.

Backend matrix (``TOKENMEM_KERNEL=<name>`` forces one):

======  ==========================  ================================
device  backend                     dtypes
======  ==========================  ================================
cpu     ``cpu`` (fused, chunked)    float32, bfloat16, float16, float64
cuda    ``triton`` (GPU kernels)    float32, bfloat16, float16
any     ``reference`` (plain torch) float32, bfloat16, float16, float64
======  ==========================  ================================

The ``reference`` backend is the specification every other backend must reproduce (see
:mod:`tokenmem.kernels.reference`). Calls with an extra 4D mask or dropout (training) always use it.
"""

from __future__ import annotations

import importlib
import os

import torch

from ..errors import TokenmemError

_MODULES = {"reference": "tokenmem.kernels.reference", "cpu": "tokenmem.kernels.cpu",
            "triton": "tokenmem.kernels.triton_backend"}
DEVICE_BACKENDS = {"cpu": "cpu", "cuda": "triton"}
DTYPES = {
    "reference": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}
_loaded: dict[str, object] = {}


def matrix() -> str:
    """The backend matrix as one line, for error messages."""
    devices = ", ".join(f"{dev} -> {name}" for dev, name in DEVICE_BACKENDS.items())
    dtypes = "; ".join(f"{name}: {', '.join(str(d).removeprefix('torch.') for d in DTYPES[name])}" for name in DTYPES)
    return f"devices: {devices}, any device -> reference (TOKENMEM_KERNEL=reference); dtypes: {dtypes}"


def backend(name: str):
    """The backend module ``name`` (imported on first use)."""
    if name not in _MODULES:
        raise TokenmemError(f"unknown kernel backend {name!r}; backends: {', '.join(_MODULES)}. {matrix()}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as exc:
            raise TokenmemError(
                f"the {name!r} kernel backend cannot be imported ({exc}); install its requirements "
                f"(triton for 'triton') or force another with TOKENMEM_KERNEL. {matrix()}"
            ) from exc
    return _loaded[name]


def backend_for(device: torch.device) -> str:
    """The backend name used for tensors on ``device`` (``TOKENMEM_KERNEL`` overrides)."""
    forced = os.environ.get("TOKENMEM_KERNEL")
    if forced:
        if forced not in _MODULES:
            raise TokenmemError(f"TOKENMEM_KERNEL={forced!r} is not a backend; {matrix()}")
        return forced
    name = DEVICE_BACKENDS.get(torch.device(device).type)
    if name is None:
        raise TokenmemError(
            f"no tokenmem kernel backend for {torch.device(device).type!r} tensors; {matrix()}. "
            "Set TOKENMEM_KERNEL=reference to run the plain-torch reference there"
        )
    return name


def _check(name, query, key, value, key_valid, query_valid, rows) -> None:
    def bad(msg):
        raise TokenmemError(f"attention_with_stats: {msg} ({name} backend). {matrix()}")

    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        bad(f"query/key/value must be 4D [batch, heads, tokens, dim], got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}")
    b, hq, q, d = query.shape
    if key.shape[0] != b or value.shape[0] != b:
        bad(f"batch sizes differ: query {b}, key {key.shape[0]}, value {value.shape[0]}")
    if key.shape[3] != d:
        bad(f"query head dim {d} != key head dim {key.shape[3]}")
    if value.shape[1] != key.shape[1] or value.shape[2] != key.shape[2]:
        bad(f"key {tuple(key.shape)} and value {tuple(value.shape)} disagree on heads or tokens")
    if key.shape[1] == 0 or hq % key.shape[1]:
        bad(f"{hq} query heads cannot be grouped over {key.shape[1]} KV heads")
    if q > key.shape[2]:
        bad(f"{q} queries but only {key.shape[2]} keys: the new tokens' keys must be among the keys")
    if not (query.dtype == key.dtype == value.dtype):
        bad(f"dtypes differ: query {query.dtype}, key {key.dtype}, value {value.dtype}")
    if query.dtype not in DTYPES[name]:
        bad(f"dtype {query.dtype} is not supported")
    if not (query.device == key.device == value.device):
        bad(f"devices differ: {query.device}, {key.device}, {value.device}")
    n = key.shape[2]
    if key_valid is not None and (key_valid.dim() != 3 or key_valid.shape[0] != b or key_valid.shape[-1] != n
                                  or key_valid.shape[1] not in (1, key.shape[1])):
        bad(f"key_valid must be bool [batch, kv_heads or 1, keys] = [{b}, {key.shape[1]}, {n}], "
            f"got {tuple(key_valid.shape)}")
    if query_valid is not None and tuple(query_valid.shape) != (b, q):
        bad(f"query_valid must be bool [batch, queries] = [{b}, {q}], got {tuple(query_valid.shape)}")
    if rows is not None and (rows.dim() != 4 or tuple(rows.shape[:2]) != (b, key.shape[1])
                             or rows.shape[2] > q or rows.shape[3] != n or rows.dtype != torch.float32):
        bad(f"rows must be float32 [batch, kv_heads, r <= {q}, {n}], got {tuple(rows.shape)} {rows.dtype}")


def attention_with_stats(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, mask=None,
                         dropout: float = 0.0, **kwargs):
    """Attention output and statistics on the backend of the tensors' device.

    See :func:`tokenmem.kernels.reference.attention_with_stats` for the contract (the specification).
    """
    name = "reference" if (mask is not None or dropout > 0.0) else backend_for(query.device)
    rows = kwargs.get("rows")
    _check(name, query, key, value, kwargs.get("key_valid"), kwargs.get("query_valid"), rows)
    if rows is not None and name == "triton" and not rows.is_contiguous():  # kernels write dense rows
        kwargs["rows"] = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        result = backend(name).attention_with_stats(query, key, value, mask=mask, dropout=dropout, **kwargs)
        rows.copy_(kwargs["rows"])
        return result
    return backend(name).attention_with_stats(query, key, value, mask=mask, dropout=dropout, **kwargs)


def gather_tokens(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A new tensor with the tokens ``index [b, h, k]`` of ``buffer [b, h, n, ...]`` (any device)."""
    return backend("reference").gather_tokens(buffer, index)


def compact_(buffers: list[torch.Tensor], index: torch.Tensor) -> None:
    """In-place compaction of token buffers ``[b, h, capacity, ...]`` to the slots ``index [b, h, k]``."""
    if not buffers:
        return
    name = backend_for(buffers[0].device)
    for buf in buffers:
        if buf.dim() < 3 or tuple(buf.shape[:2]) != tuple(index.shape[:2]) or buf.device != index.device:
            raise TokenmemError(
                f"compact_: buffer {tuple(buf.shape)} on {buf.device} does not match index {tuple(index.shape)} "
                f"on {index.device} ({name} backend). {matrix()}"
            )
    backend(name).compact_(buffers, index)
