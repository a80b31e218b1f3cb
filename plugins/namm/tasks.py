"""NAMM evolution tasks: the :class:`Task` protocol, a generic prompt task, the built-in synthetic
attention-recall task and a generation-agreement task; a registry by name (see :mod:`.evolve`)."""

from __future__ import annotations

import hashlib
import time
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from tokenmem.compat import cache_kwargs
from tokenmem.errors import TokenmemError
from tokenmem.memory import TokenMemory


MemoryFactory = Callable[[], TokenMemory]


@runtime_checkable
class Task(Protocol):
    """What the evolution needs from a task.

    * ``name``: a short identifier (logs, checkpoints).
    * ``prompts``: a list of 1-D token-id tensors or strings (strings need the task's tokenizer).
    * ``budget``: the memory budget (tokens per layer and KV head, or a fraction), ``max_new_tokens``:
      tokens generated after each prompt (0: prefill only).
    * ``load_model()``: the ``transformers`` model the task runs on (called once per process; the model
      must be deterministic across processes, e.g. built from a seeded config or loaded from disk).
    * ``run(model, memory_factory)``: runs the prompts; ``memory_factory()`` returns a fresh
      :class:`~tokenmem.TokenMemory` (NAMM under the budget, or the full cache for the reference).
      Returns anything ``score`` understands. Must be deterministic and must not use global RNGs
      without seeding them itself.
    * ``score(outputs) -> float``: higher is better; the full-cache score must be > 0 (the fitness
      divides by it).
    * optional ``interval``: the NAMM update interval the task suggests (used for the default
      :class:`NAMMConfig` when ``evolve`` gets no config).
    """

    name: str
    prompts: Sequence[torch.Tensor | str]
    budget: int | float | None
    max_new_tokens: int

    def load_model(self): ...

    def run(self, model, memory_factory: MemoryFactory) -> Any: ...

    def score(self, outputs: Any) -> float: ...


@dataclass
class TaskOutput:
    """One batch of prompts run by :meth:`PromptTask.run`."""

    index: list[int]  # positions of the batch's prompts in ``task.prompts``
    input_ids: torch.Tensor  # [b, prompt length]
    generated: torch.Tensor | None  # [b, max_new_tokens] greedy tokens, None when max_new_tokens == 0
    memory: TokenMemory  # the memory after the run
    extras: dict = field(default_factory=dict)  # task-specific data for ``score``


@dataclass
class PromptTask:
    """Base class with a generic :meth:`run`: every batch of prompts (equal-length tensors are stacked
    into one batch; strings are tokenized and run one by one) gets a fresh memory from the factory, is
    fed in chunks of ``chunk`` tokens (a streaming prefill: the memory evicts after each chunk when over
    budget; ``None`` = one call), and then ``max_new_tokens`` tokens are decoded greedily. Subclasses
    implement :meth:`score` (and :meth:`load_model`, or set ``model_path``)."""

    name: str = "prompts"
    prompts: list = field(default_factory=list)
    budget: int | float | None = None
    max_new_tokens: int = 0
    chunk: int | None = None
    model_path: str | None = None
    tokenizer: Any = None

    def load_model(self):
        if self.model_path is None:
            raise TokenmemError(f"task {self.name!r} has no model: set model_path or override load_model()")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_path).eval()
        model.generation_config.eos_token_id = None
        return model

    def _tokenizer(self):
        if self.tokenizer is None:
            if self.model_path is None:
                raise TokenmemError(f"task {self.name!r} has string prompts but no tokenizer or model_path")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self.tokenizer

    def batches(self) -> list[tuple[list[int], torch.Tensor]]:
        """``(prompt indices, input_ids [b, L])`` in a fixed order."""
        if not self.prompts:
            raise TokenmemError(f"task {self.name!r} has no prompts")
        out, tensors = [], {}
        for i, prompt in enumerate(self.prompts):
            if isinstance(prompt, str):
                ids = self._tokenizer()(prompt, return_tensors="pt").input_ids
                out.append(([i], ids))
            else:
                prompt = torch.as_tensor(prompt, dtype=torch.long)
                if prompt.dim() != 1:
                    raise TokenmemError(f"task {self.name!r}: prompt {i} must be a 1-D token-id tensor")
                tensors.setdefault(prompt.shape[0], []).append((i, prompt))
        for _, group in sorted(tensors.items()):
            out.append(([i for i, _ in group], torch.stack([p for _, p in group])))
        return sorted(out, key=lambda item: item[0][0])

    def run(self, model, memory_factory: MemoryFactory) -> list[TaskOutput]:
        outputs = []
        for index, ids in self.batches():
            memory = memory_factory()
            generated = self.feed(model, memory, ids)
            outputs.append(TaskOutput(index=index, input_ids=ids, generated=generated, memory=memory,
                                      extras=dict(self._last_feed)))
        return outputs

    def feed(self, model, memory: TokenMemory, ids: torch.Tensor) -> torch.Tensor | None:
        """Chunked prefill of ``ids`` into ``memory``, then greedy decoding; the generated tokens.

        Also records, in ``self._last_feed`` (copied into :attr:`TaskOutput.extras` by :meth:`run`), the
        prefill and decode wall times, the number of decode forward calls, and the fraction of the tokens
        seen that the memory held when the prompt ended (``held_fraction``, mean over layers)."""
        step = self.chunk or ids.shape[1]
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = None
            for s in range(0, ids.shape[1], step):
                logits = model(input_ids=ids[:, s : s + step], **cache_kwargs(model, memory), use_cache=True,
                               logits_to_keep=1).logits[:, -1]
            t1 = time.perf_counter()
            self._last_feed = {"prefill_s": t1 - t0, "decode_s": 0.0, "decode_calls": 0,
                               "held_fraction": memory.stats()["held_fraction"]}
            if not self.max_new_tokens:
                return None
            tokens = []
            for i in range(self.max_new_tokens):
                nxt = logits.argmax(-1, keepdim=True)
                tokens.append(nxt)
                if i + 1 < self.max_new_tokens:
                    logits = model(input_ids=nxt, **cache_kwargs(model, memory), use_cache=True,
                                   logits_to_keep=1).logits[:, -1]
            self._last_feed.update(decode_s=time.perf_counter() - t1, decode_calls=self.max_new_tokens - 1)
        return torch.cat(tokens, dim=1)

    def score(self, outputs) -> float:
        raise NotImplementedError

    def signature(self) -> dict:
        """What identifies the task in checkpoints (a resumed run must see the same task)."""
        digest = hashlib.sha1()
        for p in self.prompts:
            digest.update(p.encode() if isinstance(p, str) else torch.as_tensor(p).numpy().tobytes())
            digest.update(b"|")
        simple = {f.name: getattr(self, f.name) for f in fields(self)
                  if isinstance(getattr(self, f.name), (int, float, str, bool, type(None)))}
        return {"class": type(self).__qualname__, **simple, "prompts_sha1": digest.hexdigest()}


@dataclass
class SyntheticTask(PromptTask):
    """Attention recall on a tiny random-weight Llama (the built-in task, ``--task synthetic``).

    Each prompt is ``context`` random tokens followed by ``probe`` random tokens (seeded). The memory
    sees the context only, fed in chunks of ``chunk`` tokens under a hard ``budget`` (32 of 128 tokens
    per layer and KV head by default), and must then hold what the model will look at next.

    *Target* (fixed by the model and prompt, computed once with the full cache): the attention the
    ``probe`` queries give each context token, per layer and KV head (mean over the KV head's query
    group, summed over the probe queries), normalised to sum to 1 over the context.
    *Score*: the share of that attention that falls on tokens the memory still holds (masked slots do
    not count), averaged over prompts, layers and KV heads. The full cache holds every context token and
    scores 1.0; a memory keeping ``budget`` arbitrary tokens scores about ``budget / context`` (0.25).

    *Why it is learnable from NAMM's features*: the model's q/k projections are scaled up
    (``qk_scale``) so attention is peaked, as in trained models; then some tokens are persistent
    "heavy hitters" that many queries attend to, and the attention a token received so far (the EMA
    spectrogram, whose DC bin is its average attention) predicts the attention it will receive. With
    the init-scale weights the attention is nearly uniform and no policy beats chance. Measured on the
    default task: keeping arbitrary tokens (any input-ignoring scorer, the ``recent`` or ``random``
    evictors) ~0.23-0.27; a hand-set linear NAMM scorer on the DC bin ~0.40; its negation ~0.17.
    """

    name: str = "synthetic"
    seed: int = 0  # the model's weights (and the prompts unless prompt_seed is given)
    prompt_seed: int | None = None  # default seed + 1; another value gives held-out prompts for the same model
    num_prompts: int = 4
    context: int = 128
    probe: int = 16
    chunk: int | None = 32
    budget: int | float | None = 32
    interval: int = 32  # suggested NAMM interval (NAMMConfig.interval) for this task
    vocab_size: int = 320
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    weight_scale: float = 4.0  # all 2-D non-embedding weights (peaked, non-degenerate activations)
    qk_scale: float = 4.0  # q/k projections once more: attention logits with std ~6 (peaked attention)
    probes: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.context % (self.chunk or self.context):
            raise TokenmemError("SyntheticTask: context must be a multiple of chunk")
        g = torch.Generator().manual_seed(self.seed + 1 if self.prompt_seed is None else self.prompt_seed)
        ids = torch.randint(3, self.vocab_size, (self.num_prompts, self.context + self.probe), generator=g)
        self.prompts = [row[: self.context].clone() for row in ids]
        self.probes = [row[self.context :].clone() for row in ids]
        self._targets = weakref.WeakKeyDictionary()  # model -> targets

    def load_model(self):
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=2 * self.hidden_size,
                             num_hidden_layers=self.layers, num_attention_heads=self.heads,
                             num_key_value_heads=self.kv_heads, max_position_embeddings=4096,
                             bos_token_id=1, eos_token_id=None, pad_token_id=0)
        with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.mul_(self.weight_scale)
                    if "q_proj" in name or "k_proj" in name:
                        p.mul_(self.qk_scale)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return model

    def targets(self, model) -> list[torch.Tensor]:
        """Per layer ``[num_prompts, kv_heads, context]``: the probe's full-cache attention over the
        context, normalised per (prompt, KV head). Computed once per model."""
        if model not in self._targets:
            ids = torch.stack([torch.cat([c, p]) for c, p in zip(self.prompts, self.probes)])
            memory = TokenMemory(model, "full", record_stats=True)
            with torch.no_grad():
                step = self.chunk or self.context
                for s in range(0, self.context, step):
                    model(input_ids=ids[:, s : s + step], **cache_kwargs(model, memory), use_cache=True,
                          logits_to_keep=1)
                model(input_ids=ids[:, self.context :], **cache_kwargs(model, memory), use_cache=True, logits_to_keep=1)
            out = []
            for layer in memory.layers:
                mass = layer.mass[..., : self.context].to(torch.float64)
                out.append((mass / mass.sum(-1, keepdim=True)).to(torch.float32))
            self._targets[model] = out
        return self._targets[model]

    def run(self, model, memory_factory: MemoryFactory) -> list[TaskOutput]:
        targets = self.targets(model)
        outputs = super().run(model, memory_factory)
        for out in outputs:
            out.extras["targets"] = [t[out.index] for t in targets]
        return outputs

    def score(self, outputs: list[TaskOutput]) -> float:
        total, count = 0.0, 0
        for out in outputs:
            for layer, target in zip(out.memory.layers, out.extras["targets"]):
                meta = layer.meta
                held = torch.zeros_like(target)
                held.scatter_(2, meta.position.clamp(min=0, max=self.context - 1), meta.valid.to(target.dtype))
                recall = (held * target).sum(-1, dtype=torch.float64)  # [b, kv_heads]
                total += float(recall.sum())
                count += recall.numel()
        return total / count


@dataclass
class AgreementTask(PromptTask):
    """Greedy-generation agreement with the full cache (for real models and text prompts).

    Score: the mean over prompts of the fraction of the ``max_new_tokens`` greedy tokens generated
    under the memory that agree with the full-cache generation before the first divergence. The
    full-cache generations are computed once per model (inside :meth:`run`); the full cache scores 1.0.
    """

    name: str = "agreement"
    max_new_tokens: int = 16

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise TokenmemError("AgreementTask needs max_new_tokens >= 1")
        self._reference = weakref.WeakKeyDictionary()  # model -> full-cache generations

    def run(self, model, memory_factory: MemoryFactory) -> list[TaskOutput]:
        if model not in self._reference:
            full = PromptTask.run(self, model, lambda: TokenMemory(model, "full"))
            self._reference[model] = [out.generated for out in full]
        outputs = PromptTask.run(self, model, memory_factory)
        for out, ref in zip(outputs, self._reference[model]):
            out.extras["reference"] = ref
        return outputs

    def score(self, outputs: list[TaskOutput]) -> float:
        fractions = []
        for out in outputs:
            same = (out.generated == out.extras["reference"]).to(torch.int64)
            prefix = torch.cumprod(same, dim=1).sum(1)  # tokens before the first divergence
            fractions.extend((prefix.double() / same.shape[1]).tolist())
        return float(sum(fractions) / len(fractions))


# Built in: the synthetic task. The shipped language tasks are registered by :mod:`tokenmem.zoo.lm_tasks` (a layer
# above the plugins), which ``tokenmem evolve`` imports.
TASKS: dict[str, Callable[..., Task]] = {"synthetic": SyntheticTask}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make a task available to ``tokenmem evolve --task NAME`` (``factory(seed=...)`` builds it)."""
    TASKS[name] = factory


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise TokenmemError(f"unknown evolution task {name!r}; known: {', '.join(sorted(TASKS))} (the shipped "
                            "language tasks register when tokenmem.zoo.lm_tasks is imported, as `tokenmem evolve` does)")
    return TASKS[name](**options)


def _signature(task) -> dict:
    sig = getattr(task, "signature", None)
    if callable(sig):
        return sig()
    return {"class": type(task).__qualname__, "name": task.name, "budget": task.budget,
            "max_new_tokens": task.max_new_tokens, "prompts": len(task.prompts)}


# =============================================================================================
# Fitness
# =============================================================================================
