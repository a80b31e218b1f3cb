"""The registered attention function ``"tokenmem"``.

``tokenmem_attention`` is registered in transformers' ``AttentionInterface`` (with a companion entry
in ``AttentionMaskInterface`` that hands the 2D padding mask through unchanged). It returns the same
output as sdpa and, when the keys come from a :class:`~tokenmem.TokenMemory`, lets that memory compute
the attention (:meth:`~tokenmem.TokenMemory.attend`: it records per layer and KV head the attention each
stored key received, see :mod:`tokenmem.kernels.reference`, and evicts). With any other cache (or none)
it is plain attention, so a prepared model keeps working with ``DynamicCache``.

How the function finds the memory: transformers calls ``cache.update(...)`` right before attention and
does not pass the cache to the attention function, so a memory layer's ``update`` hands itself over
(:func:`expect_attention`, per thread) and the attention call of that layer claims it (:func:`claim_memory`)
when the keys are the ones the memory returned. Preparing a model for it is :mod:`tokenmem.model`.
"""

from __future__ import annotations

import threading

import torch

from . import kernels
from .compat import check_cache_kwarg
from .errors import TokenmemError, UnsupportedModelError

NAME = "tokenmem"
_local = threading.local()


def expect_attention(memory, layer_idx: int, key: torch.Tensor) -> None:
    """Called by a memory layer's ``update``: the next attention call of this layer (on this thread, with
    these keys) is computed by ``memory``."""
    _local.pending = (memory, layer_idx, key.data_ptr())


def claim_memory(layer_idx: int, key: torch.Tensor):
    """The memory that handed over ``key`` for layer ``layer_idx`` (see :func:`expect_attention`), or None."""
    pending = getattr(_local, "pending", None)
    if pending is None:
        return None
    memory, idx, ptr = pending
    if idx != layer_idx or ptr != key.data_ptr():
        return None
    _local.pending = None
    return memory


def tokenmem_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [b, hq, q, d]
    key: torch.Tensor,  # [b, hkv, n, d]
    value: torch.Tensor,  # [b, hkv, n, dv]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for the ``AttentionInterface``; returns ``([b, q, hq, dv], None)`` like sdpa."""
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError(
            f"{type(module).__name__} uses attention logit soft-capping, which the tokenmem attention does not "
            "implement yet; use a model without softcap"
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    layer_idx = getattr(module, "layer_idx", None)
    memory = claim_memory(layer_idx, key) if layer_idx is not None else None
    check_cache_kwarg(kwargs, memory)  # a memory passed as cache= to a transformers that ignores it
    _check_window(module, kwargs.get("sliding_window"), memory.seen if memory is not None else key.shape[2])
    if memory is not None:
        out = memory.attend(
            layer_idx,
            query,
            attention_mask,
            kwargs.get("position_ids"),
            scaling=scaling,
            causal=causal,
            dropout=dropout,
        )
    else:
        n, q = key.shape[2], query.shape[2]
        key_valid = query_valid = mask4d = None
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                if attention_mask.shape[-1] < n:
                    raise TokenmemError(
                        f"the 2D attention mask covers {attention_mask.shape[-1]} tokens but the keys hold {n}; "
                        "pass an attention_mask over all tokens seen so far (past + new)"
                    )
                valid = attention_mask[:, -n:].to(torch.bool)
                key_valid = valid[:, None, :]
                query_valid = valid[:, -q:]
            else:
                mask4d = attention_mask[..., -n:] if attention_mask.shape[-1] > n else attention_mask
        out, _ = kernels.attention_with_stats(
            query, key, value, scaling=scaling, causal=causal and mask4d is None,
            key_valid=key_valid, query_valid=query_valid, mask=mask4d, dropout=dropout,
        )
    return out.transpose(1, 2).contiguous(), None


def _check_window(module, window: int | None, tokens: int) -> None:
    if window is not None and tokens > window:
        raise UnsupportedModelError(
            f"{type(module).__name__} layer {getattr(module, 'layer_idx', '?')} uses sliding-window attention "
            f"(window {window}) and the sequence has reached {tokens} tokens; the tokenmem attention does not apply "
            "sliding windows. Keep sequences within the window, or load the model with config.sliding_window=None "
            "and let an evictor bound the memory instead"
        )


def tokenmem_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask interface entry: the 2D padding mask is passed through (None when nothing is padded).

    The tokenmem attention builds causality and validity itself, because after eviction the cache
    no longer lines up with the stream that a 4D mask would describe.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    attention_mask = attention_mask.to(torch.bool)
    return None if bool(attention_mask.all()) else attention_mask


_registered = False


def register() -> None:
    """Register the ``"tokenmem"`` attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, tokenmem_attention)
    AttentionMaskInterface.register(NAME, tokenmem_mask)
    _registered = True
