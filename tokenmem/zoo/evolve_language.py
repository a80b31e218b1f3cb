"""Evolve the shipped language NAMM scorer (``NAMM.pretrained("language")``).

    torchrun --nproc_per_node 2 -m tokenmem.zoo.evolve_language --generations 30   # resumable
    python -m tokenmem.zoo.evolve_language --ship                                  # copy into the package

Fitness: the mean over tasks of ``score(NAMM) / score(full cache)`` (:class:`tokenmem.plugins.namm.evolve.Fitness`)
on the *evolve* split of the shipped language tasks (:mod:`tokenmem.zoo.lm_tasks`), disjoint by file from
the *eval* split the report uses: code completion and planted-value retrieval at 25% and at 50% of the
context (NAMM keeps the tokens it scores >= 0, capped at the budget by top score), fed in 128-token
chunks with NAMM updating every 128 tokens. CMA-ES settings are the paper's (sep-CMA, sigma 0.065, elite
ratio 0.5) with a smaller population for this 2-core machine. Checkpoints go to ``--out`` (outside the
repository) after every generation; ``--ship`` writes the final mean scorer, its evolution log and a
fitness-curve PNG to ``tokenmem/zoo/scorers/language``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

DEFAULT_OUT = Path(os.environ.get("TOKENMEM_CACHE", Path.home() / ".cache" / "tokenmem")) / "namm-language"
INTERVAL = 128


def build_tasks(code_prompts: int, retrieval_per_distance: int, model_path: str | None = None):
    from .lm_tasks import CodeCompletionTask, RetrievalTask

    tasks = []
    for budget in (0.25, 0.5):
        tag = f"@{int(budget * 100)}"
        code = CodeCompletionTask(name="code-completion", split="evolve", limit=code_prompts, budget=budget,
                                  model_path=model_path)
        retrieval = RetrievalTask(name="retrieval", split="evolve", budget=budget, model_path=model_path,
                                  per_distance=retrieval_per_distance)
        code.name, retrieval.name = "code-completion" + tag, "retrieval" + tag
        tasks += [code, retrieval]
    return tasks


def plot_curve(log: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [h["generation"] for h in log["history"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(gens, log["mean_fitness"], "o-", label="mean of the search distribution")
    ax.plot(gens, log["best_fitness"], ".-", alpha=0.6, label="best member of the generation")
    if log.get("final"):  # the mean after the last update: the shipped scorer
        ax.plot([gens[-1] + 1], [log["final"]["mean_fitness"]], "*", markersize=12, label="final mean (shipped)")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (score / full-cache score, mean over tasks)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("NAMM language scorer: CMA-ES on code completion + retrieval")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def ship(out: Path) -> None:
    from . import SCORERS_DIR

    dest = SCORERS_DIR / "language"
    if not (out / "scorer.json").exists():
        raise SystemExit(f"no finished evolution in {out}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("scorer.json", "scorer.safetensors", "evolution.json"):
        shutil.copy(out / name, dest / name)
    plot_curve(json.loads((out / "evolution.json").read_text()), dest / "fitness_curve.png")
    print(f"shipped {dest}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--sigma", type=float, default=0.065)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--code-prompts", type=int, default=8)
    p.add_argument("--retrieval-per-distance", type=int, default=2)
    p.add_argument("--model", default=None, help="model directory (default: the shipped stdlib-llama)")
    p.add_argument("--ship", action="store_true", help="copy the finished scorer into the package")
    args = p.parse_args(argv)
    if args.ship:
        ship(Path(args.out))
        return 0
    from ..plugins.namm.config import NAMMConfig
    from ..plugins.namm.evolve import EvolveSettings, evolve

    tasks = build_tasks(args.code_prompts, args.retrieval_per_distance, args.model)
    settings = EvolveSettings(generations=args.generations, population=args.population, sigma=args.sigma,
                              seed=args.seed, threads=1)
    result = evolve(tasks, args.out, settings=settings, config=NAMMConfig(interval=INTERVAL), resume=True)
    if int(os.environ.get("RANK", "0")) == 0:
        print("mean fitness by generation:", " ".join(f"{v:.4f}" for v in result.mean_curve))
        print(f"reference (full cache): {result.reference}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
