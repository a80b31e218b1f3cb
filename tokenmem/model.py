"""Preparing a model for the ``"tokenmem"`` attention, and what a memory needs to know about the model.

:func:`prepare_model` switches a model's (language) attention to ``"tokenmem"`` and attaches a
:class:`ModelContext`: facts about the model that every memory on it shares (layer count, rotary
embedding, M-RoPE) and two forward hooks. Nothing in it belongs to one memory: a memory's own settings
(separator ids, ...) live on the memory, so several memories can share one loaded model.

The hooks see what the attention function is not given: the input ids of a forward call (the input
embedding's pre-hook) and multi-axis M-RoPE position ids (the decoder's pre-hook). They post them, per
thread, for the memory of that forward call, which takes them at its first attention call
(:meth:`ModelContext.take_inputs`). On transformers before 5.24 two more (a pre-hook on the model and a wrapper
of its ``generate``) hand a cache passed as ``cache=`` (the keyword of 5.24 and later) to ``past_key_values=``,
so a memory can be passed either way (:mod:`tokenmem.compat`).
"""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass, field

import torch

from .attention import NAME, register
from .compat import NEW, OLD, installed_keyword
from .errors import InputError, TokenmemError, UnsupportedModelError

_posted = threading.local()  # per thread: {(id(context), name): tensor} posted by the hooks of a forward call


@dataclass
class ModelContext:
    """What a TokenMemory needs to know about a prepared model (one per model, shared by its memories)."""

    num_layers: int
    previous_attn: str | None
    rotary: torch.nn.Module | None = None
    mrope: bool = False  # multimodal RoPE (Qwen2-VL): position ids [3, b, q], rotary sections per axis
    default_separator_ids: torch.Tensor | None = None  # prepare_model(separator_ids=...): copied by new memories
    hooks: list = field(default_factory=list)
    config: object = None  # the (text) config whose _attn_implementation must stay "tokenmem"
    restored: bool = False  # set by restore_model: the memories made on this context are done

    def check_attention(self) -> None:
        if self.restored:
            raise TokenmemError(
                "this TokenMemory was made for a model that tokenmem.restore_model() has since restored (its hooks are "
                "gone, so the memory would lose its token ids and positions); create a new TokenMemory with the model"
            )
        if self.config is not None and self.config._attn_implementation != NAME:
            raise TokenmemError(
                f"the model's attention is {self.config._attn_implementation!r}, not 'tokenmem' (was "
                "attn_implementation changed after the TokenMemory was created?); create a new TokenMemory with the "
                "model (it prepares the model) or call tokenmem.prepare_model(model)"
            )

    @property
    def inv_freq(self) -> torch.Tensor | None:
        return None if self.rotary is None else self.rotary.inv_freq

    # -- inputs of the forward call in progress (posted by the hooks, taken by its memory) --------------
    def post(self, name: str, value: torch.Tensor | None) -> None:
        box = getattr(_posted, "box", None)
        if box is None:
            box = _posted.box = {}
        box[(id(self), name)] = value

    def take_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(input_ids [b, q], mrope_position_ids [k, b, q])`` posted on this thread since the last take
        (None where nothing was posted); taking clears them."""
        box = getattr(_posted, "box", None)
        if not box:
            return None, None
        return box.pop((id(self), "input_ids"), None), box.pop((id(self), "position_ids"), None)


def _find_rotary(model: torch.nn.Module) -> torch.nn.Module | None:
    decoder = _decoder(model)
    for root in ((decoder,) if decoder is not None else ()) + (model,):  # the language model's first
        for name, module in root.named_modules():
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and "vision" not in name:
                return module
    return None


def _decoder(model) -> torch.nn.Module | None:
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return decoder if isinstance(decoder, torch.nn.Module) else None


def _is_mrope(rotary, config) -> bool:
    if getattr(rotary, "mrope_section", None) is not None:
        return True
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict) and params.get("mrope_section") is not None:
            return True
    return False


def _install_hooks(model, ctx: ModelContext) -> None:
    def post_ids(_module, args, _ctx=ctx):
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 0:
            raise InputError(f"the model was called without tokens (input ids of shape {tuple(ids.shape)}); give at "
                             "least one token per row (a BOS token, or text)")
        _ctx.post("input_ids", ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None)

    ctx.hooks.append(model.get_input_embeddings().register_forward_pre_hook(post_ids))
    decoder = _decoder(model)
    if ctx.mrope and decoder is not None:
        def post_positions(_module, args, kwargs, _ctx=ctx):
            pos = kwargs.get("position_ids")
            _ctx.post("position_ids", pos if isinstance(pos, torch.Tensor) and pos.dim() == 3 else None)

        ctx.hooks.append(decoder.register_forward_pre_hook(post_positions, with_kwargs=True))
    if installed_keyword() == OLD:  # transformers < 5.24: a cache passed as ``cache=`` goes to ``past_key_values``
        def rename_cache(_module, args, kwargs):
            if kwargs.get(NEW) is not None and kwargs.get(OLD) is None:
                kwargs[OLD] = kwargs.pop(NEW)
                return args, kwargs
            return None

        ctx.hooks.append(model.register_forward_pre_hook(rename_cache, with_kwargs=True))
        ctx.hooks.append(_GenerateRename(model))


class _GenerateRename:
    """transformers < 5.24: ``model.generate(cache=memory)`` hands the memory to ``past_key_values=`` (a method
    set on the instance over the class's ``generate``; ``remove()`` takes it away, like a hook handle)."""

    def __init__(self, model):
        self.model = model
        model.generate = types.MethodType(_generate_either, model)

    def remove(self) -> None:
        self.model.__dict__.pop("generate", None)


def _generate_either(self, *args, **kwargs):
    if kwargs.get(NEW) is not None and kwargs.get(OLD) is None:
        kwargs[OLD] = kwargs.pop(NEW)
    return type(self).generate(self, *args, **kwargs)


def prepare_model(model, *, separator_ids=None) -> ModelContext:
    """Switch ``model``'s (language) attention to ``"tokenmem"`` and attach a :class:`ModelContext`.

    Idempotent: a prepared model returns its existing context. ``separator_ids`` become the default of
    memories created afterwards without separator ids of their own (each memory copies them).
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
        rotary = _find_rotary(model)
        ctx = ModelContext(num_layers=config.num_hidden_layers, previous_attn=previous, rotary=rotary,
                           mrope=_is_mrope(rotary, config), config=config)
        _install_hooks(model, ctx)
        model._tokenmem_context = ctx
    elif model.config._attn_implementation != NAME:  # prepared before, switched away since
        model.set_attn_implementation(NAME)
    if separator_ids is not None:
        ctx.default_separator_ids = as_id_tensor(separator_ids)
    return ctx


def as_id_tensor(ids) -> torch.Tensor:
    """Sorted, unique int64 token ids."""
    return torch.as_tensor(sorted(set(int(i) for i in ids)), dtype=torch.long)


def restore_model(model) -> None:
    """Undo :func:`prepare_model`: the previous attention implementation and no hooks."""
    ctx = getattr(model, "_tokenmem_context", None)
    if ctx is None:
        return
    for hook in ctx.hooks:
        hook.remove()
    ctx.restored = True
    model.set_attn_implementation(ctx.previous_attn or "sdpa")
    del model._tokenmem_context
