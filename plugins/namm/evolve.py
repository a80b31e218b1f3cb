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
fsync, ``os.replace``; the pickle is followed by its SHA-256, see :mod:`tokenmem.files`, so a damaged file
is refused by name instead of resuming from wrong numbers; checkpoints written before the checksum load
unchecked): the pickled :class:`cma.CMAEvolutionStrategy` (which owns its random stream,
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
import json
import math
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tokenmem.errors import TokenmemError
from tokenmem.files import atomic_write, load_pickle, seal
from tokenmem.memory import TokenMemory

from .config import NAMMConfig
from .evictor import NAMM
from .scorer import initial_params, num_params
from .tasks import (  # noqa: F401  (re-exported: the task API lives in .tasks)
    AgreementTask, MemoryFactory, PromptTask, SyntheticTask, Task, TaskOutput, _signature, get_task, register_task,
)

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


class Fitness:
    """``theta -> mean over tasks of score(NAMM(theta)) / score(full cache)``, or of
    ``task.relative_score(outputs(NAMM(theta)), outputs(full cache))`` for tasks that define it (the
    likelihood tasks of :mod:`.likelihood`).

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

    def compute_reference(self) -> dict[str, float | list]:
        """Each task's score with the full cache (computed once; the fitness divides by it), or, for a task
        with ``relative_score`` (:mod:`.likelihood`), its full-cache outputs (per-prompt values)."""
        ref = {}
        for task, model in zip(self.tasks, self.models):
            outputs = task.run(model, self.memory_factory(task, model, "full"))
            if hasattr(task, "relative_score"):
                ref[task.name] = [float(v) for v in outputs]
                if not all(math.isfinite(v) for v in ref[task.name]):
                    raise TokenmemError(f"task {task.name!r} gives non-finite values with the full cache")
                continue
            value = float(task.score(outputs))
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
        return self.evictor_scores(self.namm(vector))

    def evictor_scores(self, evictor) -> dict[str, float]:
        """Per-task ratio score(memory) / score(full) of any evictor (a name or an Evictor) on these tasks."""
        if self.reference is None:
            self.compute_reference()
        out = {}
        for task, model in zip(self.tasks, self.models):
            outputs = task.run(model, self.memory_factory(task, model, evictor))
            if hasattr(task, "relative_score"):
                out[task.name] = float(task.relative_score(outputs, self.reference[task.name]))
            else:
                out[task.name] = float(task.score(outputs)) / self.reference[task.name]
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

            # Every rank reaches the destroy together: a rank that tears gloo down while its peer is still
            # writing the final files can abort the peer's pending socket threads (CI saw a SIGABRT,
            # "terminate called without an active exception", in rank 1 of the two-process test).
            dist.barrier()
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
    patience: int | None = None  # stop early when the mean's fitness has not improved for this many generations

    def __post_init__(self):
        if self.generations < 0:
            raise TokenmemError(f"generations must be >= 0, got {self.generations}")
        if self.population < 2:
            raise TokenmemError(f"population must be >= 2, got {self.population}")
        if not self.sigma > 0:
            raise TokenmemError(f"sigma must be > 0, got {self.sigma}")
        if not 0 < self.elite_ratio <= 1:
            raise TokenmemError(f"elite_ratio must lie in (0, 1], got {self.elite_ratio}")
        if self.patience is not None and self.patience < 1:
            raise TokenmemError(f"patience must be >= 1 generation (or None: never stop early), got {self.patience}")

    @property
    def mu(self) -> int:
        return max(1, min(self.population, round(self.elite_ratio * self.population)))

    def identity(self) -> dict:
        """The settings a resumed run must share (``generations``, ``threads`` and ``patience`` may change)."""
        d = asdict(self)
        for name in ("generations", "threads", "patience"):
            d.pop(name)
        return d


def stalled(history: list[dict], patience: int | None) -> bool:
    """True when the mean's fitness has not improved on its best for ``patience`` generations."""
    if not patience or not history:
        return False
    values = [h["mean_fitness"] for h in history]
    best = max(range(len(values)), key=lambda i: (values[i], -i))  # the first generation reaching the best
    return len(values) - 1 - best >= patience


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


def load_checkpoint(out_dir) -> dict:
    path = Path(out_dir) / CHECKPOINT
    _import_cma()  # unpickling the strategy imports cma: do it with its import-time warning silenced
    state = load_pickle(path, "NAMM evolution checkpoint",
                        "delete it (and evolution.json) to start the evolution again, or restore a copy")
    if (not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT
            or state.get("version") != CHECKPOINT_VERSION):
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
            if dist.broadcast_object(stalled(state["history"], settings.patience) if rank0 else None):
                if bar is not None:
                    bar.write(f"stopping: the mean's fitness has not improved for {settings.patience} generations")
                break
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
                    atomic_write(out / CHECKPOINT, seal(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)))
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
    atomic_write(out / LOG, (json.dumps(log, indent=1) + "\n").encode())


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
                              threads=args.threads, patience=getattr(args, "patience", None))
    result = evolve(tasks, args.out, settings=settings, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        curve = " ".join(f"{v:.4f}" for v in result.mean_curve)
        print(f"mean fitness by generation: {curve}")
        print(f"final mean fitness {result.mean_fitness:.4f} (initial {result.initial_fitness:.4f}), "
              f"best seen {result.best_fitness:.4f}; reference (full cache) {result.reference}")
        print(f"scorer saved to {args.out} (NAMM.from_file), best member to {Path(args.out) / 'best'}, "
              f"log {Path(args.out) / LOG}")
    return 0
