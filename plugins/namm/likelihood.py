"""Continuous, low-noise NAMM fitness tasks: teacher-forced answer likelihood and streaming perplexity.

A greedy-decoding task scores 0 or 1 per prompt (exact match) or a coarse edit similarity, so a fitness built
on a few such prompts moves by whole prompts between two nearly equal scorers. These tasks instead measure, per
prompt, how much of the full cache's *log-likelihood* a memory keeps:

* :class:`AnswerLikelihoodTask`: each prompt is streamed into the memory in ``chunk``-token calls (the memory
  evicts after each one when over budget, exactly as the evaluation streams it), then its answer tokens are fed
  teacher-forced in one call; the prompt's value is the mean log-probability of the answer tokens.
* :class:`StreamingPerplexityTask`: a window is streamed in ``chunk``-token calls and every token is predicted
  from what the memory holds; the value is the mean log-probability of the window's tokens (minus the loss).

:meth:`relative_score` compares a memory with the full cache prompt by prompt: the mean over prompts of
``exp(value_memory - value_full)`` (1.0 for the full cache itself; the geometric-mean probability ratio of the
answer tokens). The :class:`~.evolve.Fitness` uses it when a task has it, instead of ``score / score_full``.

Prompts of one batch must have equal lengths (no padding: a float budget is a fraction of the tokens seen, which
padding would change); answers may differ in length (right-padded, masked: causal attention keeps the padding
out of the real tokens' logits). Batching changes the values only by float rounding.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from tokenmem.compat import cache_kwargs
from tokenmem.errors import TokenmemError

from .tasks import MemoryFactory


def _checked_prompts(name: str, prompts) -> list[torch.Tensor]:
    out = []
    for i, p in enumerate(prompts):
        p = torch.as_tensor(p, dtype=torch.long)
        if p.dim() != 1 or p.numel() < 2:
            raise TokenmemError(f"task {name!r}: prompt {i} must be a 1-D token-id tensor of at least 2 tokens")
        out.append(p)
    if not out:
        raise TokenmemError(f"task {name!r} has no prompts")
    return out


def _batches(name: str, prompts: list[torch.Tensor], batch_size: int) -> list[list[int]]:
    """Consecutive prompt indices, ``batch_size`` at a time, each batch of one prompt length. When a batch would mix
    lengths, the error names the batch sizes that would not: those dividing every run of consecutive equal-length
    prompts but the last (e.g. 8 prompts per length: 1, 2, 4 or 8)."""
    if batch_size < 1:
        raise TokenmemError(f"task {name!r}: batch_size must be >= 1, got {batch_size}")
    out = []
    for s in range(0, len(prompts), batch_size):
        index = list(range(s, min(len(prompts), s + batch_size)))
        lengths = {prompts[i].numel() for i in index}
        if len(lengths) > 1:
            runs: list[int] = []
            for i, p in enumerate(prompts):
                if i and p.numel() == prompts[i - 1].numel():
                    runs[-1] += 1
                else:
                    runs.append(1)
            whole = math.gcd(*runs[:-1])  # a batch size fits when it divides every run but the last
            fits = [d for d in range(1, whole + 1) if whole % d == 0]
            raise TokenmemError(f"task {name!r}: prompts {index} have different lengths {sorted(lengths)}; "
                                f"batch_size={batch_size} would mix lengths in a batch: use one of {fits} (runs of "
                                f"{runs} equal-length prompts), or build equal-length prompts")
        out.append(index)
    return out


def _stream(model, memory, ids: torch.Tensor, chunk: int, logits_to_keep: int | None):
    """Feed ``ids [b, L]`` in ``chunk``-token calls; yields ``(start, logits)`` of every call."""
    for s in range(0, ids.shape[1], chunk):
        kwargs = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        yield s, model(input_ids=ids[:, s : s + chunk], **cache_kwargs(model, memory), use_cache=True, **kwargs).logits


def _signature(task, extra: list[torch.Tensor]) -> dict:
    digest = hashlib.sha1()
    for p in list(task.prompts) + extra:
        digest.update(torch.as_tensor(p).numpy().tobytes())
        digest.update(b"|")
    return {"class": type(task).__qualname__, "name": task.name, "budget": task.budget, "chunk": task.chunk,
            "batch_size": task.batch_size, "prompts": len(task.prompts), "sha1": digest.hexdigest()}


@dataclass
class AnswerLikelihoodTask:
    """Mean log-probability of each prompt's answer tokens, teacher-forced after a streamed prompt.

    ``prompts``: 1-D token-id tensors; ``answers``: the token ids that follow each prompt (the planted value's
    digits, the next line of code). ``score`` (for reports) is the mean over prompts of the mean answer
    log-probability; the fitness uses :meth:`relative_score` against the full cache.
    """

    name: str = "answer-likelihood"
    prompts: list = field(default_factory=list)
    answers: list = field(default_factory=list)
    budget: int | float | None = None
    chunk: int = 128
    batch_size: int = 4
    max_new_tokens: int = 0  # the Task protocol's field: nothing is generated
    model: object = field(default=None, repr=False)  # what load_model() returns (or override load_model)

    def __post_init__(self):
        self.prompts = _checked_prompts(self.name, self.prompts)
        self.answers = [torch.as_tensor(a, dtype=torch.long) for a in self.answers]
        if len(self.answers) != len(self.prompts) or any(a.dim() != 1 or a.numel() == 0 for a in self.answers):
            raise TokenmemError(f"task {self.name!r}: every prompt needs a non-empty 1-D answer "
                                f"({len(self.prompts)} prompts, {len(self.answers)} answers)")
        if self.chunk < 1:
            raise TokenmemError(f"task {self.name!r}: chunk must be >= 1, got {self.chunk}")
        self._order = _batches(self.name, self.prompts, self.batch_size)

    def load_model(self):
        if self.model is None:
            raise TokenmemError(f"task {self.name!r} has no model: pass model= or override load_model()")
        return self.model

    def run(self, model, memory_factory: MemoryFactory) -> list[float]:
        """Per prompt, the mean log-probability of its answer tokens under a fresh memory per batch."""
        values = [0.0] * len(self.prompts)
        with torch.no_grad():
            for index in self._order:
                ids = torch.stack([self.prompts[i] for i in index])  # [b, L]
                answers = [self.answers[i] for i in index]
                width = max(a.numel() for a in answers)
                target = torch.zeros(len(index), width, dtype=torch.long)  # [b, A] right-padded answers
                mask = torch.zeros(len(index), width, dtype=torch.bool)
                for row, a in enumerate(answers):
                    target[row, : a.numel()], mask[row, : a.numel()] = a, True
                memory = memory_factory()
                for _, logits in _stream(model, memory, ids, self.chunk, logits_to_keep=1):
                    last = logits[:, -1]  # [b, V]: predicts the first answer token
                if width > 1:  # the answer teacher-forced in one call: its logits predict tokens 1..A-1
                    rest = model(input_ids=target[:, :-1], **cache_kwargs(model, memory), use_cache=True).logits
                    logits = torch.cat([last[:, None], rest], dim=1)  # [b, A, V]
                else:
                    logits = last[:, None]
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[..., None])[..., 0]  # [b, A]
                for row, i in enumerate(index):
                    values[i] = float(logp[row][mask[row]].double().mean())
        return values

    def score(self, outputs: list[float]) -> float:
        return float(sum(outputs) / len(outputs))

    def relative_score(self, outputs: list[float], reference: list[float]) -> float:
        """Mean over prompts of ``exp(value - value_full)``: the share of the full cache's answer likelihood
        (geometric mean per answer token) the memory keeps; 1.0 for the full cache itself."""
        if len(outputs) != len(reference):
            raise TokenmemError(f"task {self.name!r}: {len(outputs)} values against {len(reference)} references")
        return float(sum(math.exp(v - r) for v, r in zip(outputs, reference)) / len(outputs))

    def signature(self) -> dict:
        return _signature(self, self.answers)


@dataclass
class StreamingPerplexityTask:
    """Every token of each window predicted from what the memory holds while the window streams in.

    A window is fed in ``chunk``-token calls (the memory evicts after each when over budget); the value of a
    window is the mean log-probability of its tokens 1..L-1 (minus its streaming loss). A scorer that breaks the
    model's next-token prediction pays for it here.
    """

    name: str = "streaming-perplexity"
    prompts: list = field(default_factory=list)
    budget: int | float | None = None
    chunk: int = 128
    batch_size: int = 4
    max_new_tokens: int = 0
    model: object = field(default=None, repr=False)

    def __post_init__(self):
        self.prompts = _checked_prompts(self.name, self.prompts)
        if self.chunk < 1:
            raise TokenmemError(f"task {self.name!r}: chunk must be >= 1, got {self.chunk}")
        self._order = _batches(self.name, self.prompts, self.batch_size)

    load_model = AnswerLikelihoodTask.load_model

    def run(self, model, memory_factory: MemoryFactory) -> list[float]:
        values = [0.0] * len(self.prompts)
        with torch.no_grad():
            for index in self._order:
                ids = torch.stack([self.prompts[i] for i in index])  # [b, L]
                total = torch.zeros(len(index), dtype=torch.float64)
                memory = memory_factory()
                for s, logits in _stream(model, memory, ids[:, :-1], self.chunk, logits_to_keep=None):
                    target = ids[:, s + 1 : s + 1 + logits.shape[1]]  # [b, c]
                    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[..., None])[..., 0]
                    total += logp.double().sum(-1)
                for row, i in enumerate(index):
                    values[i] = float(total[row] / (ids.shape[1] - 1))
        return values

    score = AnswerLikelihoodTask.score
    relative_score = AnswerLikelihoodTask.relative_score

    def signature(self) -> dict:
        return _signature(self, [])


__all__ = ["AnswerLikelihoodTask", "StreamingPerplexityTask"]
