"""The registered attention function ``"tokenmem"`` and the preparation of a model to use it.

``tokenmem_attention`` is registered in transformers' ``AttentionInterface`` (with a companion entry
in ``AttentionMaskInterface`` that hands the 2D padding mask through unchanged). It returns the same
output as sdpa and, when the keys come from a :class:`~tokenmem.TokenMemory`, records per layer and
KV head the attention each stored key received (see :mod:`tokenmem.kernels.reference`) and lets the
memory evict. With any other cache (or none) it is plain attention, so a prepared model keeps working
with ``DynamicCache``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from . import kernels
from .errors import TokenmemError, UnsupportedModelError

NAME = "tokenmem"
_local = threading.local()


def _set_pending(memory, layer_idx: int, key: torch.Tensor) -> None:
    """Called by the memory's ``update``: the next attention call of this layer reads from it."""
    _local.pending = (memory, layer_idx, key.data_ptr())


def _take_pending(layer_idx: int, key: torch.Tensor):
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
    memory = _take_pending(layer_idx, key) if layer_idx is not None else None
    _check_window(module, kwargs.get("sliding_window"), memory.seen if memory is not None else key.shape[2])
    if memory is not None:
        out = memory._attend(
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


# ---------------------------------------------------------------------------------------------
# Model preparation
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelContext:
    """What a TokenMemory needs to know about a prepared model (one per model, shared by memories)."""

    num_layers: int
    previous_attn: str | None
    rotary: torch.nn.Module | None = None
    separator_ids: torch.Tensor | None = None  # int64 ids
    last_input_ids: torch.Tensor | None = None  # set by the embedding hook each forward
    hooks: list = field(default_factory=list)
    config: object = None  # the (text) config whose _attn_implementation must stay "tokenmem"

    def check_attention(self) -> None:
        if self.config is not None and self.config._attn_implementation != NAME:
            raise TokenmemError(
                f"the model's attention is {self.config._attn_implementation!r}, not 'tokenmem' (was "
                "attn_implementation changed after the TokenMemory was created?); create a new TokenMemory with the "
                "model (it prepares the model) or call tokenmem.prepare_model(model)"
            )

    @property
    def inv_freq(self) -> torch.Tensor | None:
        return None if self.rotary is None else self.rotary.inv_freq


def _find_rotary(model: torch.nn.Module) -> torch.nn.Module | None:
    for name, module in model.named_modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and "vision" not in name:
            return module
    return None


def prepare_model(model, *, separator_ids=None) -> ModelContext:
    """Switch ``model``'s (language) attention to ``"tokenmem"`` and attach a :class:`ModelContext`.

    Idempotent: a prepared model returns its existing context (separator ids are updated when given).
    """
    from transformers import PreTrainedModel

    register()
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(
            f"TokenMemory needs a transformers PreTrainedModel, got {type(model).__name__}; load the model with "
            "AutoModelForCausalLM.from_pretrained (or pass model=None and drive the memory yourself)"
        )
    ctx = getattr(model, "_tokenmem_context", None)
    if ctx is None:
        if not type(model)._can_set_attn_implementation():
            raise UnsupportedModelError(
                f"{type(model).__name__} computes attention in its own code instead of through transformers' "
                "AttentionInterface, so the tokenmem attention cannot be registered for it. Use a model family that "
                "supports attn_implementation switching (Llama, Mistral, Qwen2, GPT-2, ...)"
            )
        previous = model.config._attn_implementation
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:
            raise UnsupportedModelError(
                f"could not switch {type(model).__name__} to the tokenmem attention "
                f"(it still uses {model.config._attn_implementation!r})"
            )
        config = model.config.get_text_config()
        ctx = ModelContext(num_layers=config.num_hidden_layers, previous_attn=previous, rotary=_find_rotary(model),
                           config=config)
        embeddings = model.get_input_embeddings()

        def remember_ids(_module, args, _ctx=ctx):
            ids = args[0] if args else None
            _ctx.last_input_ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

        ctx.hooks.append(embeddings.register_forward_pre_hook(remember_ids))
        model._tokenmem_context = ctx
    elif model.config._attn_implementation != NAME:  # prepared before, switched away since
        model.set_attn_implementation(NAME)
    if separator_ids is not None:
        ctx.separator_ids = torch.as_tensor(sorted(set(int(i) for i in separator_ids)), dtype=torch.long)
    return ctx


def restore_model(model) -> None:
    """Undo :func:`prepare_model`: the previous attention implementation and no hooks."""
    ctx = getattr(model, "_tokenmem_context", None)
    if ctx is None:
        return
    for hook in ctx.hooks:
        hook.remove()
    model.set_attn_implementation(ctx.previous_attn or "sdpa")
    del model._tokenmem_context
