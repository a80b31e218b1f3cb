"""Evolve the shipped language NAMM scorer (``NAMM.pretrained("language")``).

    python -m tokenmem.zoo.evolve_language                                   # v3: resumable, checkpoint per generation
    torchrun --nproc_per_node 2 -m tokenmem.zoo.evolve_language              # the same on two processes
    python -m tokenmem.zoo.evolve_language --status                          # where a run stands
    python -m tokenmem.zoo.evolve_language --ship                            # copy the finished scorer into the package
    python -m tokenmem.zoo.evolve_language --version v2                      # the shipped language-v2's run

**v3 (the default).** v2's search and likelihood fitness with two changes, both from what v2's evaluation showed
(README, "NAMM v2"): the retrieval prompts are laid out as the eval split's (``retrieval-early``: the value near
the start of a 320-1,600-token prompt, :mod:`tokenmem.zoo.namm_fitness`), and the scorer gets one more input
feature, each token's key distinctiveness (KeyDiff's score; ``NAMMConfig(key_diff=True)``), with the search
starting from the scorer that keeps all tokens without a budget and KeyDiff's tokens under one
(:func:`tokenmem.plugins.namm.scorer.initial_params`). Checkpoints in ``~/.cache/tokenmem/namm-language-v3``.

**v2 (``--version v2``).** Fitness: the mean over six tasks of how much of the full
cache's likelihood NAMM keeps (:mod:`tokenmem.plugins.namm.likelihood`): the teacher-forced log-likelihood of
the answer after a streamed prompt (code completion: the next line; retrieval: the planted value's digits) and
the streaming perplexity of code windows, each at 25% and 50% of the context, on 32 equal-length prompts per
task from the *evolve* split (:mod:`tokenmem.zoo.namm_fitness`), disjoint by file from the *eval* split the
reports use. Prompts stream in 128-token chunks with NAMM updating every 128 tokens (the interval v1 used).
CMA-ES: the paper's settings (sep-CMA-ES, sigma0 0.065, elite ratio 0.5) with population 16 (the paper: 32),
40 generations or until the mean has not improved for 10. Checkpoints go to ``--out`` (outside the repository)
after every generation; a killed run resumes where it stopped.

**v1 (``--version v1``)**: the ratio of greedy-decoding scores (edit similarity, exact match) to the full cache
on 8 prompts per task: the fitness of the ``language-v1`` scorer, kept for reproducibility.

``--ship`` writes the final mean scorer, its evolution log and a fitness-curve PNG to
``tokenmem/zoo/scorers/language``, first moving the scorer found there to ``language-{its version}`` (so every
earlier version stays loadable by name).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("TOKENMEM_CACHE", Path.home() / ".cache" / "tokenmem"))
DEFAULT_OUT = {"v3": CACHE / "namm-language-v3", "v2": CACHE / "namm-language-v2", "v1": CACHE / "namm-language"}
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
    likelihood = any("likelihood" in str(t).lower() or "perplexity" in str(t).lower() for t in log.get("tasks", []))
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (mean exp(logp - logp full) over tasks)" if likelihood
                  else "fitness (score / full-cache score, mean over tasks)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"NAMM language scorer {log.get('scorer_version', 'v2')}: CMA-ES, likelihood fitness" if likelihood
                 else "NAMM language scorer: CMA-ES on code completion + retrieval")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def status(out: Path) -> str:
    """A few lines on where the run in ``out`` stands (from its log)."""
    log_file = out / "evolution.json"
    if not log_file.exists():
        return f"no run in {out}"
    log = json.loads(log_file.read_text())
    curve = log["mean_fitness"]
    seconds = sum(log["seconds_per_generation"])
    lines = [f"{out}: {log['generations_done']} generations done ({seconds / 3600:.2f} h of generations, "
             f"{seconds / max(1, len(curve)) / 60:.1f} min each)"]
    if curve:
        lines.append(f"mean fitness: first {curve[0]:.4f}, last {curve[-1]:.4f}, best {max(curve):.4f}; "
                     f"best member seen {max(log['best_fitness']):.4f}")
    lines.append("finished: final mean " + (f"{log['final']['mean_fitness']:.4f}" if log.get("final") else "not yet"))
    return "\n".join(lines)


def run_version(log: dict) -> str:
    """The scorer version an evolution log was made for, read from its fitness tasks: v3's ``retrieval-early``,
    v2's likelihood tasks, v1's greedy-decoding ones (``scorer_version`` when the log has one)."""
    if log.get("scorer_version"):
        return log["scorer_version"]
    tasks = log.get("tasks") or []
    names = [str(t.get("name", "")) for t in tasks]
    classes = {str(t.get("class", "")) for t in tasks}
    if any(n.startswith("retrieval-early@") for n in names):
        return "v3"
    if classes & {"AnswerLikelihoodTask", "StreamingPerplexityTask"}:
        return "v2"
    if classes & {"CodeCompletionTask", "RetrievalTask"}:
        return "v1"
    raise SystemExit(f"cannot tell which scorer version this evolution log is for (tasks: {names})")


def shipped_version(directory: Path) -> str:
    """The version of the scorer shipped in ``directory`` (from its ``evolution.json``)."""
    return run_version(json.loads((Path(directory) / "evolution.json").read_text()))


def ship(out: Path, version: str) -> None:
    from . import SCORERS_DIR

    dest = SCORERS_DIR / "language"
    if not (out / "scorer.json").exists():
        raise SystemExit(f"no finished evolution in {out}")
    log = json.loads((out / "evolution.json").read_text())
    made_for = run_version(log)
    if made_for != version:
        raise SystemExit(f"{out} holds a {made_for} evolution, not {version}: pass --version {made_for} (or the "
                         f"--out of the {version} run)")
    if dest.exists():
        previous = shipped_version(dest)
        if previous == version:
            raise SystemExit(f"{dest} already holds a {version} scorer; remove it to ship this run again")
        older = SCORERS_DIR / f"language-{previous}"
        if older.exists():
            raise SystemExit(f"{older} exists: cannot keep the shipped {previous} scorer loadable under its name")
        shutil.move(str(dest), str(older))  # loadable as NAMM.pretrained(f"language-{previous}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("scorer.json", "scorer.safetensors"):
        shutil.copy(out / name, dest / name)
    log["scorer_version"] = version
    (dest / "evolution.json").write_text(json.dumps(log, indent=1) + "\n")
    plot_curve(log, dest / "fitness_curve.png")
    print(f"shipped {dest}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", choices=("v3", "v2", "v1"), default="v3",
                   help="v3 (default): likelihood fitness with eval-like retrieval and the key feature; v2: the "
                        "shipped language-v2's likelihood fitness; v1: the greedy-decoding fitness of language-v1")
    p.add_argument("--out", default=None, help="run directory (default: ~/.cache/tokenmem/namm-language-{version}, "
                                               "namm-language for v1)")
    p.add_argument("--generations", type=int, default=None, help="default 40 (v1: 30)")
    p.add_argument("--population", type=int, default=None, help="default 16 (v1: 12)")
    p.add_argument("--patience", type=int, default=None, help="stop when the mean has not improved for this many "
                                                              "generations (default 10 for v2, none for v1)")
    p.add_argument("--sigma", type=float, default=0.065)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="v2: prompts per forward call")
    p.add_argument("--code-prompts", type=int, default=8, help="v1 only")
    p.add_argument("--retrieval-per-distance", type=int, default=2, help="v1 only")
    p.add_argument("--model", default=None, help="model directory (default: the shipped stdlib-llama)")
    p.add_argument("--status", action="store_true", help="print where the run stands and exit")
    p.add_argument("--ship", action="store_true", help="copy the finished scorer into the package")
    args = p.parse_args(argv)
    likelihood = args.version != "v1"  # a likelihood fitness (v2 and v3)
    out = Path(args.out) if args.out else DEFAULT_OUT[args.version]
    if args.status:
        print(status(out))
        return 0
    if args.ship:
        ship(out, args.version)
        return 0
    from ..plugins.namm.config import NAMMConfig
    from ..plugins.namm.evolve import EvolveSettings, evolve

    if likelihood:
        from . import namm_fitness

        model = None
        if args.model:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tasks = namm_fitness.tasks(model, batch_size=args.batch_size, version=args.version)
        models = [t.model for t in tasks]
    else:
        tasks, models = build_tasks(args.code_prompts, args.retrieval_per_distance, args.model), None
    patience = args.patience if args.patience is not None else (10 if likelihood else None)
    settings = EvolveSettings(generations=args.generations or (40 if likelihood else 30),
                              population=args.population or (16 if likelihood else 12), sigma=args.sigma,
                              seed=args.seed, threads=1, patience=patience)
    config = NAMMConfig(interval=INTERVAL, key_diff=args.version == "v3")
    result = evolve(tasks, out, settings=settings, config=config, models=models, resume=True)
    if int(os.environ.get("RANK", "0")) == 0:
        print("mean fitness by generation:", " ".join(f"{v:.4f}" for v in result.mean_curve))
        print(f"reference (full cache): {result.reference}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
