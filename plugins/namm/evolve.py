"""Evolve a NAMM scorer with CMA-ES (Cetin et al., "An Evolved Universal Transformer Memory", 2024,
arXiv:2410.13166): tasks, fitness, a distributed population evaluation, checkpoints, the command.

**Search.** CMA-ES from the maintained :mod:`cma` package (Hansen et al.): the reference
implementation, actively maintained, picklable, with the standard defaults for step-size and covariance
adaptation, and it offers both a full covariance and a diagonal one (sep-CMA-ES, option
``CMA_diagonal``). The search space is the scorer's flat parameter vector (4,172 values with the default
:class:`~.config.NAMMConfig`); the initial mean is :func:`~.scorer.initial_params` (all weights zero,
output bias 1: every token scores 1 and is kept), the step size ``sigma0 = 0.065``, the population 32
and the mean moves to the weighted recombination of the best ``elite_ratio * population`` members (16).
**We use the diagonal covariance by default (sep-CMA-ES, ``CMA_diagonal=True``)**, because the full one
is too slow and too big at 4,172 dimensions: measured with cma 4.5 on the 2-core CPU machine this was
written on, the full matrix is 139 MB (pickled into every per-generation checkpoint), ask+tell costs
~0.65 s per generation before any eigendecomposition, and the eigendecomposition cma redoes every ~40
generations takes ~35 s (``numpy.linalg.eigh`` of 4,172 x 4,172), against ~2-3 s to evaluate a whole
population of the synthetic task. Its learning rates are also tiny at this size (``c1 = 1.1e-7``,
``cmu = 8.7e-7``): in tens of generations with 32 samples each the full matrix would barely move from
the identity. sep-CMA-ES is linear in time and memory (ask+tell ~10 ms, checkpoint ~4 MB) and adapts
one scale per coordinate with ~2,000x larger learning rates (``c1_sep = 2.3e-4``, ``cmu_sep = 1.7e-3``).
``diagonal=False``
(``--full-covariance``) selects the full matrix for small scorers.

**Fitness.** For a parameter vector ``theta``: the mean over tasks of
``task score with NAMM(theta) / task score with the full cache`` on the same prompts. The full-cache
scores are computed once (a ``full`` :class:`~tokenmem.TokenMemory`, no budget) and cached. Every
generation evaluates the population *and the current mean*; the mean is what is reported, saved and
returned (plus the best member seen).

**Tasks** implement :class:`Task`: ``prompts``, ``budget``, ``max_new_tokens``, ``load_model()``,
``run(model, memory_factory) -> outputs`` and ``score(outputs) -> float``. :class:`PromptTask` gives
a generic ``run`` (chunked prefill, then greedy decoding, one fresh memory per prompt batch);
:class:`SyntheticTask` is the built-in learnable task (attention recall on a tiny random Llama), and
:class:`AgreementTask` scores greedy generations against the full cache for real models.

**Processes.** Single process by default; under ``torchrun --nproc_per_node N`` (or any launcher that
sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``, e.g. ``accelerate launch``) a ``gloo`` process group is
created. Rank 0 owns the CMA-ES state: it samples the population and broadcasts it (float64, exact);
each rank evaluates the candidates ``i`` with ``i % world_size == rank`` (every evaluation is
self-contained: fresh memory, same prompts, one intra-op thread), the fitness values are all-gathered,
and rank 0 updates the strategy, checkpoints and logs. Fitness values are bitwise identical with 1 or N
processes.

**Checkpoints.** After every generation rank 0 writes ``<out>/checkpoint.pkl`` atomically (temp file,
fsync, ``os.replace``): the pickled :class:`cma.CMAEvolutionStrategy` (which owns its random stream,
see :class:`_Randn`), the number of completed generations, the fitness history, the mean and best
vectors, the normalisation statistics, the full-cache reference scores, the settings and the numpy and
torch RNG states. ``resume=True`` continues from it: no generation is lost or repeated and the result
equals an uninterrupted run with the same seeds. At the end the final mean scorer is saved with
``namm.save(out)`` (``scorer.json`` + ``scorer.safetensors``; load with ``NAMM.from_file(out)``), the
best member to ``<out>/best``, and the fitness log to ``<out>/evolution.json`` (also rewritten every
generation).

Command: ``tokenmem evolve --task synthetic --generations 20 --population 32 --sigma 0.065 --out DIR
[--resume] [--seed 0]``, also under ``torchrun --nproc_per_node 2 -m tokenmem.cli evolve ...``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from tokenmem.errors import TokenmemError
from tokenmem.memory import TokenMemory

from .config import NAMMConfig
from .evictor import NAMM
from .scorer import initial_params, num_params

__all__ = [
    "AgreementTask", "EvolutionResult", "EvolveSettings", "Fitness", "PromptTask", "SyntheticTask", "Task", "TaskOutput",
    "evaluate_population", "evolve", "get_task", "load_checkpoint", "make_strategy", "register_task",
]

CHECKPOINT = "checkpoint.pkl"
LOG = "evolution.json"
CHECKPOINT_FORMAT = "tokenmem-namm-evolution"
CHECKPOINT_VERSION = 1


def _import_cma():
    with warnings.catch_warnings():  # cma warns at import when matplotlib is missing (plots only)
        warnings.simplefilter("ignore")
        import cma
    return cma


# =============================================================================================
# Tasks
# =============================================================================================
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
            outputs.append(TaskOutput(index=index, input_ids=ids, generated=generated, memory=memory))
        return outputs

    def feed(self, model, memory: TokenMemory, ids: torch.Tensor) -> torch.Tensor | None:
        """Chunked prefill of ``ids`` into ``memory``, then greedy decoding; the generated tokens."""
        step = self.chunk or ids.shape[1]
        with torch.no_grad():
            logits = None
            for s in range(0, ids.shape[1], step):
                logits = model(input_ids=ids[:, s : s + step], past_key_values=memory, use_cache=True,
                               logits_to_keep=1).logits[:, -1]
            if not self.max_new_tokens:
                return None
            tokens = []
            for i in range(self.max_new_tokens):
                nxt = logits.argmax(-1, keepdim=True)
                tokens.append(nxt)
                if i + 1 < self.max_new_tokens:
                    logits = model(input_ids=nxt, past_key_values=memory, use_cache=True, logits_to_keep=1).logits[:, -1]
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
                    model(input_ids=ids[:, s : s + step], past_key_values=memory, use_cache=True, logits_to_keep=1)
                model(input_ids=ids[:, self.context :], past_key_values=memory, use_cache=True, logits_to_keep=1)
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


TASKS: dict[str, Callable[..., Task]] = {"synthetic": SyntheticTask}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make a task available to ``tokenmem evolve --task NAME`` (``factory(seed=...)`` builds it)."""
    TASKS[name] = factory


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise TokenmemError(f"unknown evolution task {name!r}; known: {', '.join(sorted(TASKS))}")
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
class Fitness:
    """``theta -> mean over tasks of score(NAMM(theta)) / score(full cache)``.

    Holds the tasks' models (loaded once), the NAMM config and normalisation statistics and the
    full-cache reference scores. Each call is self-contained (fresh memories, the tasks' fixed prompts),
    so the value of a vector does not depend on which process evaluates it or in which order.
    """

    def __init__(self, tasks: Sequence[Task], config: NAMMConfig, models: Sequence | None = None):
        if not tasks:
            raise TokenmemError("evolution needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise TokenmemError(f"task names must be unique, got {names}")
        self.tasks = list(tasks)
        self.config = config
        self.models = list(models) if models is not None else [t.load_model() for t in self.tasks]
        self.norm_mean = torch.zeros(config.bins)
        self.norm_var = torch.ones(config.bins)
        self.reference: dict[str, float] | None = None
        self.failures = 0

    def memory_factory(self, task, model, evictor) -> MemoryFactory:
        if isinstance(evictor, str) and evictor == "full":
            return lambda: TokenMemory(model, "full")
        return lambda: TokenMemory(model, evictor, budget=task.budget, interval=self.config.interval)

    def calibrate(self) -> None:
        """Feature normalisation: per-bin mean/variance of the EMA features seen by the initial scorer
        on the tasks' prompts (so the spectrogram features are on the recency features' scale)."""
        namm = NAMM(self.config)
        namm.start_calibration()
        for task, model in zip(self.tasks, self.models):
            task.run(model, self.memory_factory(task, model, namm))
        namm.freeze()
        self.norm_mean, self.norm_var = namm.norm_mean.clone(), namm.norm_var.clone()

    def compute_reference(self) -> dict[str, float]:
        """Each task's score with the full cache (computed once; the fitness divides by it)."""
        ref = {}
        for task, model in zip(self.tasks, self.models):
            value = float(task.score(task.run(model, self.memory_factory(task, model, "full"))))
            if not value > 0 or not math.isfinite(value):
                raise TokenmemError(f"task {task.name!r} scores {value} with the full cache; the fitness divides "
                                    "by the full-cache score, which must be finite and > 0")
            ref[task.name] = value
        self.reference = ref
        return ref

    def namm(self, vector) -> NAMM:
        params = torch.as_tensor(np.asarray(vector, dtype=np.float64)).to(torch.float32)
        return NAMM(self.config, params, self.norm_mean, self.norm_var)

    def scores(self, vector) -> dict[str, float]:
        """Per-task ratio score(NAMM) / score(full)."""
        if self.reference is None:
            self.compute_reference()
        namm = self.namm(vector)
        out = {}
        for task, model in zip(self.tasks, self.models):
            out[task.name] = float(task.score(task.run(model, self.memory_factory(task, model, namm)))) / self.reference[task.name]
        return out

    def __call__(self, vector) -> float:
        try:
            ratios = self.scores(vector)
        except TokenmemError:  # e.g. NaN scores from a degenerate candidate: worst fitness, counted
            self.failures += 1
            return 0.0
        return float(sum(ratios.values()) / len(ratios))


# =============================================================================================
# Processes
# =============================================================================================
@dataclass
class Dist:
    """The process group the evolution runs in (a no-op for a single process)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this module created the group (and destroys it)

    @classmethod
    def setup(cls) -> "Dist":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), False)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            if not dist.is_available():
                raise TokenmemError("WORLD_SIZE > 1 but torch.distributed is not available")
            dist.init_process_group("gloo")  # env:// (torchrun / accelerate launch set the variables)
            return cls(dist.get_rank(), dist.get_world_size(), True)
        return cls()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(tensor, src=0)
        return tensor

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.world == 1:
            return [tensor]
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(out, tensor)
        return out


def evaluate_population(candidates: np.ndarray, fitness: Callable[[np.ndarray], float], dist: Dist | None = None) -> np.ndarray:
    """Fitness of every row of ``candidates [P, D]`` (identical on every rank): rank ``r`` evaluates the
    rows ``i`` with ``i % world == r``, the values are all-gathered."""
    dist = dist or Dist()
    count = candidates.shape[0]
    local = torch.full((count,), float("nan"), dtype=torch.float64)
    for i in range(dist.rank, count, dist.world):
        local[i] = fitness(candidates[i])
    gathered = dist.all_gather(local)
    return np.array([float(gathered[i % dist.world][i]) for i in range(count)], dtype=np.float64)


@contextlib.contextmanager
def _threads(n: int | None):
    if not n:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# =============================================================================================
# CMA-ES state and checkpoints
# =============================================================================================
class _Randn:
    """The N(0, 1) source of the strategy (cma option ``randn``): a seeded numpy Generator owned by the
    strategy, so pickling the strategy captures the stream and a resumed run draws exactly the samples
    of an uninterrupted one (cma's default, the global ``np.random``, would be shared with everything
    else in the process and pickled by copy)."""

    def __init__(self, seed: int):
        self.generator = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape):
        return self.generator.standard_normal(size=shape)


@dataclass
class EvolveSettings:
    generations: int = 20
    population: int = 32
    sigma: float = 0.065
    elite_ratio: float = 0.5  # mu = round(elite_ratio * population) members recombine into the mean
    seed: int = 0
    diagonal: bool = True  # sep-CMA-ES (linear cost); False: full covariance (O(n^2) memory)
    threads: int | None = 1  # intra-op threads per process (1: bitwise-identical fitness for any process count)
    calibrate: bool = True  # feature normalisation from the initial scorer's features

    def __post_init__(self):
        if self.generations < 0:
            raise TokenmemError(f"generations must be >= 0, got {self.generations}")
        if self.population < 2:
            raise TokenmemError(f"population must be >= 2, got {self.population}")
        if not self.sigma > 0:
            raise TokenmemError(f"sigma must be > 0, got {self.sigma}")
        if not 0 < self.elite_ratio <= 1:
            raise TokenmemError(f"elite_ratio must lie in (0, 1], got {self.elite_ratio}")

    @property
    def mu(self) -> int:
        return max(1, min(self.population, round(self.elite_ratio * self.population)))

    def identity(self) -> dict:
        """The settings a resumed run must share (``generations`` and ``threads`` may change)."""
        d = asdict(self)
        d.pop("generations")
        d.pop("threads")
        return d


def make_strategy(x0: np.ndarray, settings: EvolveSettings):
    cma = _import_cma()
    options = {
        "popsize": settings.population,
        "CMA_mu": settings.mu,
        "CMA_diagonal": True if settings.diagonal else 0,
        "randn": _Randn(settings.seed),
        "seed": float("nan"),  # do not touch the global np.random (our randn is seeded)
        "verbose": -9,
        "verb_log": 0,  # no outcmaes/ files
        "verb_disp": 0,
        "maxiter": float("inf"),
        "tolfun": 0, "tolfunhist": 0, "tolflatfitness": float("inf"), "tolx": 0, "tolstagnation": float("inf"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cma.CMAEvolutionStrategy(np.asarray(x0, dtype=np.float64), settings.sigma, options)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(out_dir) -> dict:
    path = Path(out_dir) / CHECKPOINT
    _import_cma()  # unpickling the strategy imports cma: do it with its import-time warning silenced
    with open(path, "rb") as f:
        state = pickle.load(f)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        raise TokenmemError(f"{path} is not a tokenmem NAMM evolution checkpoint (version {CHECKPOINT_VERSION})")
    return state


@dataclass
class EvolutionResult:
    mean_params: np.ndarray  # the final CMA-ES mean (float64)
    mean_fitness: float  # its fitness
    best_params: np.ndarray  # the best member (or mean) evaluated during the run
    best_fitness: float
    history: list[dict]  # one record per generation (see ``evolve``)
    reference: dict[str, float]  # full-cache score per task
    norm_mean: torch.Tensor
    norm_var: torch.Tensor
    config: NAMMConfig
    out_dir: Path | None = None

    @property
    def initial_fitness(self) -> float:
        return self.history[0]["mean_fitness"] if self.history else self.mean_fitness

    @property
    def mean_curve(self) -> list[float]:
        """Fitness of the mean at generations 0..G (the last one is the final mean)."""
        return [h["mean_fitness"] for h in self.history] + [self.mean_fitness]

    def namm(self) -> NAMM:
        return NAMM(self.config, torch.as_tensor(self.mean_params).float(), self.norm_mean, self.norm_var)


# =============================================================================================
# The evolution loop
# =============================================================================================
def evolve(
    tasks: Task | Sequence[Task],
    out_dir=None,
    *,
    settings: EvolveSettings | None = None,
    config: NAMMConfig | None = None,
    models: Sequence | None = None,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    **overrides,
) -> EvolutionResult:
    """Evolve a NAMM scorer on ``tasks`` with CMA-ES; returns the final mean (on every rank).

    ``settings`` (or keyword overrides such as ``generations=20, population=32, sigma=0.065,
    elite_ratio=0.5, seed=0, diagonal=True``) configure the search. ``config`` is the NAMM config
    (default: :class:`NAMMConfig` with the first task's ``interval`` if it has one). ``out_dir`` (rank 0)
    receives the per-generation checkpoint, ``evolution.json`` and the final scorers; ``resume=True``
    continues from ``out_dir/checkpoint.pkl`` when present. ``callback(record)`` runs on rank 0 after
    each generation's checkpoint is written (raising from it stops the run, e.g. to simulate a kill).

    Each history record: ``generation``, ``mean_fitness`` (the mean the generation was sampled from),
    ``best_fitness``/``median_fitness``/``worst_fitness`` of the population, ``population_fitness``,
    ``best_ever`` and ``sigma`` (step size after the update).
    """
    tasks = [tasks] if not isinstance(tasks, (list, tuple)) else list(tasks)
    settings = settings or EvolveSettings()
    if overrides:
        settings = EvolveSettings(**{**asdict(settings), **overrides})
    if config is None:
        config = NAMMConfig(interval=getattr(tasks[0], "interval", NAMMConfig().interval))
    out = Path(out_dir) if out_dir is not None else None
    dist = Dist.setup()
    try:
        with _threads(settings.threads):
            return _evolve(tasks, out, settings, config, models, resume, callback, progress, dist)
    finally:
        dist.close()


def _evolve(tasks, out, settings, config, models, resume, callback, progress, dist: Dist) -> EvolutionResult:
    rank0 = dist.rank == 0
    dims = num_params(config)
    fitness = Fitness(tasks, config, models)
    signature = {"tasks": [_signature(t) for t in tasks], "config": config.to_dict(), "settings": settings.identity(),
                 "dims": dims}

    # -- state: fresh or from the checkpoint (rank 0 decides, everyone learns the outcome) --------------
    state = None
    if rank0 and out is not None:
        path = out / CHECKPOINT
        if path.exists():
            if not resume:
                raise TokenmemError(f"{path} exists: pass resume=True (--resume) to continue that run, or use a new directory")
            state = load_checkpoint(out)
            if state["signature"] != signature:
                raise TokenmemError(f"{path} was written by a different run (tasks/config/settings differ): "
                                    f"{state['signature']} vs {signature}")
    have = dist.broadcast_object(state is not None)
    if have:
        norm = dist.broadcast_object((state["norm_mean"], state["norm_var"]) if rank0 else None)
        fitness.norm_mean, fitness.norm_var = norm
        fitness.reference = dist.broadcast_object(state["reference"] if rank0 else None)
    else:
        if settings.calibrate:
            fitness.calibrate()  # every rank computes; rank 0's values are used everywhere
            fitness.norm_mean, fitness.norm_var = dist.broadcast_object((fitness.norm_mean, fitness.norm_var))
        fitness.compute_reference()
        fitness.reference = dist.broadcast_object(fitness.reference)

    if rank0:
        if state is None:
            x0 = initial_params(config).double().numpy()
            state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "signature": signature,
                     "generation": 0, "es": make_strategy(x0, settings), "history": [], "timing": [],
                     "best_params": x0.copy(), "best_fitness": -math.inf, "mean_params": x0.copy(),
                     "norm_mean": fitness.norm_mean, "norm_var": fitness.norm_var, "reference": fitness.reference}
        else:
            np.random.set_state(state["numpy_rng"])
            torch.set_rng_state(state["torch_rng"])
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
    start = int(dist.broadcast(torch.tensor([state["generation"] if rank0 else 0], dtype=torch.int64))[0])

    bar = None
    if rank0 and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.generations, initial=min(start, settings.generations), desc="NAMM CMA-ES",
                   unit="gen", dynamic_ncols=True)
        if state["history"]:
            bar.set_postfix(best=f"{state['best_fitness']:.4f}", mean=f"{state['history'][-1]['mean_fitness']:.4f}")

    count = settings.population + 1  # the mean, then the population
    try:
        for generation in range(start, settings.generations):
            tick = time.perf_counter()
            candidates = torch.zeros(count, dims, dtype=torch.float64)
            if rank0:
                es = state["es"]
                population = es.ask()
                candidates[0] = torch.from_numpy(np.array(es.mean, dtype=np.float64))
                candidates[1:] = torch.from_numpy(np.stack(population).astype(np.float64))
            candidates = dist.broadcast(candidates).numpy()
            values = evaluate_population(candidates, fitness, dist)
            if rank0:
                es.tell(population, [-float(v) for v in values[1:]])  # cma minimises
                i = int(np.argmax(values))
                if values[i] > state["best_fitness"]:
                    state["best_fitness"], state["best_params"] = float(values[i]), candidates[i].copy()
                pop = values[1:]
                record = {"generation": generation, "mean_fitness": float(values[0]), "best_fitness": float(pop.max()),
                          "median_fitness": float(np.median(pop)), "worst_fitness": float(pop.min()),
                          "best_ever": state["best_fitness"], "sigma": float(es.sigma),
                          "population_fitness": [float(v) for v in pop]}
                state["history"].append(record)
                state["timing"].append(time.perf_counter() - tick)
                state["generation"] = generation + 1
                state["mean_params"] = np.array(es.mean, dtype=np.float64)
                state["numpy_rng"] = np.random.get_state()
                state["torch_rng"] = torch.get_rng_state()
                if out is not None:
                    _atomic_write(out / CHECKPOINT, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
                    _write_log(out, state, fitness, settings, final=None)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(best=f"{record['best_fitness']:.4f}", mean=f"{record['mean_fitness']:.4f}")
                if callback is not None:
                    callback(record)
    finally:
        if bar is not None:
            bar.close()

    # -- the final mean ----------------------------------------------------------------------------
    final = torch.zeros(2, dims, dtype=torch.float64)
    if rank0:
        final[0] = torch.from_numpy(np.asarray(state["mean_params"], dtype=np.float64))
        final[1] = torch.from_numpy(np.asarray(state["best_params"], dtype=np.float64))
    final = dist.broadcast(final).numpy()
    mean_fitness = float(evaluate_population(final[:1], fitness, dist)[0])
    history = dist.broadcast_object(state["history"] if rank0 else None)
    best_fitness = dist.broadcast_object(state["best_fitness"] if rank0 else None)
    if mean_fitness > best_fitness:
        best_fitness, final[1] = mean_fitness, final[0]
    result = EvolutionResult(mean_params=final[0].copy(), mean_fitness=mean_fitness, best_params=final[1].copy(),
                             best_fitness=best_fitness, history=history, reference=dict(fitness.reference),
                             norm_mean=fitness.norm_mean, norm_var=fitness.norm_var, config=config, out_dir=out)
    if rank0 and out is not None:
        result.namm().save(out)
        NAMM(config, torch.as_tensor(result.best_params).float(), fitness.norm_mean, fitness.norm_var).save(out / "best")
        _write_log(out, state, fitness, settings, final={"mean_fitness": mean_fitness, "best_fitness": best_fitness})
    return result


def _write_log(out: Path, state: dict, fitness: Fitness, settings: EvolveSettings, final: dict | None) -> None:
    log = {
        "settings": asdict(settings),
        "cma": {"implementation": "cma " + _import_cma().__version__,
                "covariance": "diagonal (sep-CMA-ES)" if settings.diagonal else "full", "mu": settings.mu},
        "config": fitness.config.to_dict(),
        "dimensions": num_params(fitness.config),
        "tasks": state["signature"]["tasks"],
        "reference": fitness.reference,
        "generations_done": state["generation"],
        "mean_fitness": [h["mean_fitness"] for h in state["history"]],
        "best_fitness": [h["best_fitness"] for h in state["history"]],
        "history": state["history"],
        "seconds_per_generation": state["timing"],
        "failed_evaluations_rank0": fitness.failures,
        "final": final,
    }
    _atomic_write(out / LOG, (json.dumps(log, indent=1) + "\n").encode())


# =============================================================================================
# The command
# =============================================================================================
def main(args) -> int:
    """Entry point of ``tokenmem evolve`` (options in :func:`tokenmem.cli.build_parser`; every rank runs
    it under torchrun)."""
    names = args.task or ["synthetic"]
    tasks = [get_task(name, seed=args.task_seed) for name in names]
    settings = EvolveSettings(generations=args.generations, population=args.population, sigma=args.sigma,
                              elite_ratio=args.elite_ratio, seed=args.seed, diagonal=not args.full_covariance,
                              threads=args.threads)
    result = evolve(tasks, args.out, settings=settings, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        curve = " ".join(f"{v:.4f}" for v in result.mean_curve)
        print(f"mean fitness by generation: {curve}")
        print(f"final mean fitness {result.mean_fitness:.4f} (initial {result.initial_fitness:.4f}), "
              f"best seen {result.best_fitness:.4f}; reference (full cache) {result.reference}")
        print(f"scorer saved to {args.out} (NAMM.from_file), best member to {Path(args.out) / 'best'}, "
              f"log {Path(args.out) / LOG}")
    return 0
