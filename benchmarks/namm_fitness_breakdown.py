"""The NAMM fitness (v2, or v3 with ``--version v3``) task by task, for the shipped scorers and the training-free evictors.

An analysis on the *evolve* split (the data the v2 scorer was chosen on), not a result: it shows where the
evolution's fitness gain came from (which of the six tasks), next to the same numbers for ``language-v1`` and
the training-free evictors, so that the held-out tables (``benchmarks/language.py``, ``tokenmem bench``) can be
read against it. Every value is the fitness's per-task score: the mean over the task's 32 prompts of
``exp(mean logp_memory - mean logp_full)`` (1.0 = the full cache), prompts streamed in 128-token chunks with
eviction every 128 tokens, as during the evolution (:mod:`tokenmem.zoo.namm_fitness`).

    python benchmarks/namm_fitness_breakdown.py [--evictors language language-v1 h2o recent keydiff]
                                                [--quick] [--json out.json] [--out out.md]
    python benchmarks/namm_fitness_breakdown.py --version v3 --evictors initial-v3 keydiff language recent h2o

``--version v3``: the v3 fitness (``retrieval-early`` in place of ``retrieval``); ``initial-v3`` is the v3
search's starting scorer (the key feature on, :func:`tokenmem.plugins.namm.scorer.initial_params`).
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evictors", nargs="+", default=["language", "language-v1", "h2o", "recent", "keydiff"],
                   help="registered evictor names, or NAMM scorers: a shipped name (language, language-v2, "
                        "language-v1), 'initial' or a scorer directory")
    p.add_argument("--version", choices=("v2", "v3"), default="v2", help="whose fitness (default v2)")
    p.add_argument("--quick", action="store_true", help="4 prompts per task (smoke test)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from tokenmem.plugins.namm import NAMM
    from tokenmem.plugins.namm.config import NAMMConfig
    from tokenmem.evictor_list import registered
    from tokenmem.plugins.namm.evolve import Fitness
    from tokenmem.zoo import namm_fitness
    from tokenmem.zoo.evolve_language import INTERVAL

    torch.set_num_threads(args.threads)
    tasks = namm_fitness.tasks(None, limit=4 if args.quick else None, batch_size=4, version=args.version)
    fitness = Fitness(tasks, NAMMConfig(interval=INTERVAL), [t.model for t in tasks])
    t0 = time.perf_counter()
    fitness.compute_reference()
    print(f"full-cache reference: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for name in args.evictors:
        if name == "initial-v3":
            evictor = NAMM(NAMMConfig(interval=INTERVAL, key_diff=True))
        else:
            evictor = name if name in registered() else NAMM.load(name)
        t0 = time.perf_counter()
        scores = fitness.evictor_scores(evictor)
        row = {"evictor": name, "scores": scores, "fitness": sum(scores.values()) / len(scores),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"  {name:<12} fitness {row['fitness']:.4f}  " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
              + f"  ({row['seconds']:.0f} s)", flush=True)
    names = list(rows[0]["scores"]) if rows else []
    lines = ["| evictor | fitness | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row['evictor']} | {row['fitness']:.3f} | "
                     + " | ".join(f"{row['scores'][n]:.3f}" for n in names) + " |")
    table = "\n".join(lines)
    print()
    print(f"NAMM {args.version} fitness by task (evolve split, {len(tasks[0].prompts)} prompts per task; "
          "1.0 = full cache)")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"NAMM {args.version} fitness by task (evolve split: the data the {args.version} scorer is chosen "
                    f"on; 1.0 = full cache)\n\n" + table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "prompts_per_task": len(tasks[0].prompts), "version": args.version}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
