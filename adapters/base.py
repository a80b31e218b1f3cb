"""The adapter base: what every modality shares, written once.

A modality turns its inputs into a :class:`Prompt` (token ids, attention mask, per-token
:class:`~tokenmem.TokenMeta`, position ids, and for multimodal models the input embeddings and the extra
``generate`` inputs); the base then

- creates memories for the model with the adapter's options and its tokenizer's separators
  (:meth:`Adapter.memory`),
- feeds a prompt in chunks, each chunk's metadata annotated before its forward call, so the memory evicts
  while it reads (:func:`prefill`),
- generates, either from the whole prompt at once or after a chunked prefill (:func:`generate`),
- builds the metadata shared by modalities: separator flags, a protected span after the media (the question
  about a video), media tokens grouped into segments (:func:`prompt_meta`).

Position ids may carry a leading axis (M-RoPE ``[3, b, q]``, Qwen2-VL): chunks slice the last axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmem.compat import cache_kwargs
from tokenmem.errors import InputError, TokenmemError
from tokenmem.memory import TokenMemory
from tokenmem.meta import MODALITIES, PROTECT, SEPARATOR, TokenMeta
from tokenmem.separators import separator_ids


@dataclass
class Prompt:
    """A modality's prompt, ready for the model."""

    input_ids: torch.Tensor  # [b, q]
    attention_mask: torch.Tensor  # [b, q] (1 = real token; padding on the left)
    meta: TokenMeta | None = None  # fields [b, q]; None: the memory's defaults (text, input ids)
    position_ids: torch.Tensor | None = None  # [b, q] or [k, b, q] (M-RoPE); None: from the mask
    inputs_embeds: torch.Tensor | None = None  # [b, q, d]: fed instead of the ids while prefilling (media)
    model_inputs: dict = field(default_factory=dict)  # more generate() inputs (pixels) for an unprefilled prompt

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def positions(self) -> torch.Tensor:
        """The position ids (``[b, q]`` from the mask, as ``generate`` counts them, unless given)."""
        if self.position_ids is not None:
            return self.position_ids
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def meta_of(self, start: int, end: int) -> TokenMeta | None:
        """The metadata of tokens ``start .. end - 1`` (None without metadata)."""
        return None if self.meta is None else TokenMeta.from_packed(self.meta.pack()[:, start:end])

    def to(self, device) -> "Prompt":
        def move(x):
            return x.to(device) if isinstance(x, torch.Tensor) else x

        return Prompt(move(self.input_ids), move(self.attention_mask), self.meta, move(self.position_ids),
                      move(self.inputs_embeds), {k: move(v) for k, v in self.model_inputs.items()})


def check_prompt(prompt: Prompt) -> None:
    """An empty prompt (no tokens) cannot be prefilled or generated from: say so before the model fails on it."""
    if prompt.input_ids.dim() != 2 or prompt.length == 0 or prompt.input_ids.shape[0] == 0:
        raise InputError(f"the prompt has no tokens (input ids of shape {tuple(prompt.input_ids.shape)}); give at "
                         "least one token per row (a BOS token, or text)")


def check_chunk(chunk, what: str = "prefill chunk") -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise TokenmemError(f"{what} must be a positive number of tokens, got {chunk!r}")


@torch.no_grad()
def prefill(model, memory: TokenMemory, prompt: Prompt, chunk: int) -> None:
    """Feed all but the last prompt token through ``model`` in chunks of ``chunk`` tokens, annotating each
    chunk's metadata; the last token's metadata is annotated for the next call (``generate``'s first).

    ``model.generate(input_ids, attention_mask=..., **cache_kwargs(model, memory))`` then continues from the last
    token: the memory reports the tokens it has seen, so generate feeds only what is new. The ids are fed, or
    ``prompt.inputs_embeds`` when the modality placed media features in them.
    """
    check_chunk(chunk)
    check_prompt(prompt)
    if memory.seen:
        raise TokenmemError("prefill() needs a fresh TokenMemory (this one has already seen tokens)")
    total = prompt.length - 1
    mask, positions = prompt.attention_mask, prompt.positions()
    for start in range(0, total, chunk):
        end = min(total, start + chunk)
        meta = prompt.meta_of(start, end)
        if meta is not None:
            memory.annotate(meta)
        tokens = ({"input_ids": prompt.input_ids[:, start:end]} if prompt.inputs_embeds is None
                  else {"inputs_embeds": prompt.inputs_embeds[:, start:end]})
        model(**tokens, attention_mask=mask[:, :end], position_ids=positions[..., start:end],
              **cache_kwargs(model, memory), use_cache=True, logits_to_keep=1)
    last = prompt.meta_of(total, total + 1)
    if last is not None:
        memory.annotate(last)  # generate's first call: the last prompt token


@torch.no_grad()
def generate(model, memory: TokenMemory, prompt: Prompt, *, prefill_chunk: int | None = None, **generate_kwargs):
    """``model.generate`` under ``memory``: the whole prompt in generate's first call (with the modality's
    extra inputs), or after :func:`prefill` in chunks of ``prefill_chunk`` tokens. Returns what generate
    returns (the sequences ``[b, prompt + new]`` unless asked for more)."""
    check_prompt(prompt)
    if prefill_chunk is None:
        if prompt.meta is not None:
            memory.annotate(prompt.meta)
        extra = prompt.model_inputs
    else:
        prefill(model, memory, prompt, prefill_chunk)
        extra = {}  # the media are in the memory already
    return model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                          **cache_kwargs(model, memory), **extra, **generate_kwargs)


def prompt_meta(ids: torch.Tensor, mask: torch.Tensor, separators, *, media: torch.Tensor | None = None,
                tokens_per_segment: int = 1, modality: str = "frame", protect_after_media: bool = False) -> TokenMeta:
    """Metadata ``[b, q]`` of a prompt whose ``media`` tokens (bool ``[b, q]``: video or image placeholders)
    come in segments of ``tokens_per_segment`` (a frame's tokens).

    Media tokens get ``modality``, segment = their index among the row's media tokens // ``tokens_per_segment``
    and, in the token field, their index inside the segment; text tokens get modality ``text``, segment -1, their
    input id and the ``separator`` flag when their id is in ``separators``. ``protect_after_media`` flags
    ``protect`` every real text token after the row's last media token (the question about a video)."""
    b, q = ids.shape
    media = torch.zeros_like(ids, dtype=torch.bool) if media is None else media
    rank = media.long().cumsum(-1) - 1  # index among the row's media tokens
    slot = torch.arange(q).expand(b, q)
    last_media = torch.where(media, slot, -1).amax(-1, keepdim=True)
    flags = torch.isin(ids, torch.tensor(list(separators), dtype=torch.long)) & ~media
    flags = flags.long() * SEPARATOR
    if protect_after_media:
        span = ~media & (slot > last_media) & mask.bool()
        flags |= span.long() * PROTECT
    return TokenMeta.build(
        b, q,
        modality=torch.where(media, MODALITIES[modality], MODALITIES["text"]),
        segment=torch.where(media, rank // tokens_per_segment, -1),
        token=torch.where(media, rank % tokens_per_segment, ids),
        flags=flags,
    )


class Adapter:
    """A model and its tokenizer with memory options; modalities subclass it and build :class:`Prompt` s.

    Args:
        model: the model whose forward and ``generate`` are called.
        tokenizer: its tokenizer (separators come from it), or None.
        memory_model: the module a memory prepares (default ``model``; a multimodal model's language model,
            so that the vision tower keeps its own attention).
        memory_options: default :class:`~tokenmem.TokenMemory` options of :meth:`memory`.
    """

    def __init__(self, model, tokenizer=None, *, memory_model=None, memory_options: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.memory_model = model if memory_model is None else memory_model
        self.memory_options = dict(memory_options or {})
        self._separators: list[int] | None = None

    @property
    def separators(self) -> list[int]:
        """The tokenizer's separator ids (empty without a tokenizer)."""
        if self._separators is None:
            self._separators = [] if self.tokenizer is None else separator_ids(self.tokenizer)
        return self._separators

    def memory(self, **options) -> TokenMemory:
        """A fresh TokenMemory on :attr:`memory_model` with the adapter's options (``options`` override them)
        and the tokenizer's separators."""
        options = {**self.memory_options, **options}
        if self.tokenizer is not None and "config" not in options:
            options.setdefault("separator_ids", self.separators)
        return TokenMemory(self.memory_model, **options)

    def prefill(self, prompt: Prompt, memory: TokenMemory, chunk: int) -> None:
        prefill(self.model, memory, prompt, chunk)

    def generate_prompt(self, prompt: Prompt, memory: TokenMemory, *, prefill_chunk: int | None = None,
                        **generate_kwargs):
        """:func:`generate` with this adapter's model (greedy unless told otherwise)."""
        generate_kwargs.setdefault("do_sample", False)
        return generate(self.model, memory, prompt, prefill_chunk=prefill_chunk, **generate_kwargs)
