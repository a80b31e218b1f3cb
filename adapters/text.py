"""Text adapter: any causal LM (Llama, Mistral, Qwen2, GPT-2 are tested) with a TokenMemory.

Separators (for SepLLM) come from the tokenizer (:func:`tokenmem.separators.separator_ids`: every vocabulary
entry whose text is one of ``. , ? ! ; : space tab newline``, with or without a leading space marker).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tokenmem.errors import TokenmemError
from tokenmem.files import load_pretrained
from tokenmem.memory import TokenMemory
from tokenmem.separators import SEPARATOR_TEXTS, separator_ids  # noqa: F401  (re-exported)

from . import base
from .base import Adapter, Prompt

TESTED_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def load_causal_lm(path: str, *, dtype: torch.dtype | str = "auto", **kwargs):
    """``(model, tokenizer)`` from a local directory with the real ``from_pretrained``; left padding set up."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise TokenmemError(
            f"model path {path!r} is not a local directory; tokenmem loads models with from_pretrained on a local "
            "path (save one with model.save_pretrained(path) and tokenizer.save_pretrained(path))"
        )
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path)
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, path, dtype=dtype, **kwargs)
    model.eval()
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Left padding, and a pad token (EOS) for tokenizers without one (GPT-2)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def prefill(model, memory: TokenMemory, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            chunk: int = 512) -> None:
    """Feed all but the last prompt token through ``model`` in chunks of ``chunk`` tokens (:func:`.base.prefill`).

    ``model.generate(input_ids, attention_mask=..., **cache_kwargs(model, memory))`` then continues from the
    last token: the memory reports the tokens it has seen, so generate feeds only what is new.
    Positions follow the attention mask (left padding), as generate's own would.
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    base.prefill(model, memory, Prompt(input_ids, mask), chunk)


@dataclass
class Generation:
    texts: list[str]
    sequences: torch.Tensor  # [b, prompt + new]
    memory: TokenMemory


class TextAdapter(Adapter):
    """A causal LM + tokenizer with helpers to generate under a TokenMemory.

    >>> adapter = TextAdapter.from_pretrained("path/to/model")
    >>> result = adapter.generate(["def f(x):"], evictor="sink", budget=256, max_new_tokens=32)
    >>> print(result.texts[0]); print(result.memory.summary())
    """

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.family = getattr(model.config, "model_type", "?")
        prepare_tokenizer(tokenizer)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "TextAdapter":
        return cls(*load_causal_lm(path, **kwargs))

    def memory(self, evictor="full", budget=None, interval: int | None = None, positions: str = "original", **options):
        """A TokenMemory for this model with the tokenizer's separators."""
        return super().memory(evictor=evictor, budget=budget, interval=interval, positions=positions, **options)

    def encode(self, prompts: str | list[str]) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise TokenmemError("prompts must be a non-empty string or list of strings")
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        if enc["input_ids"].shape[1] == 0:
            raise TokenmemError("the prompt tokenized to zero tokens; give a non-empty prompt")
        return {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def generate(self, prompts, *, evictor="full", budget=None, interval=None, positions="original",
                 max_new_tokens: int = 64, memory: TokenMemory | None = None, prefill_chunk: int | None = None,
                 **generate_kwargs) -> Generation:
        """Greedy (unless told otherwise) generation under a fresh (or given) TokenMemory.

        ``prefill_chunk`` feeds the prompt in chunks of that many tokens (the memory evicts after each),
        as a deployed memory would: device memory then stays bounded by ``budget + prefill_chunk``
        however long the prompt.
        """
        enc = self.encode(prompts)
        if memory is None:  # (a Cache with no layers yet is falsy: test for None)
            memory = self.memory(evictor, budget, interval, positions)
        prompt = Prompt(enc["input_ids"], enc["attention_mask"])
        out = self.generate_prompt(prompt, memory, prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens,
                                   pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return Generation(texts=texts, sequences=out, memory=memory)
