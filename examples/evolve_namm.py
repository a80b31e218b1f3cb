"""Evolve a NAMM scorer with CMA-ES on the built-in synthetic task, then use it.

The task (``SyntheticTask``): a tiny random-weight Llama streams 128 random tokens through a memory of
32 tokens per layer and KV head; the score is the share of the attention that the next 16 queries give
the context (under the full cache) which lands on tokens the memory still holds. Any scorer that ignores
its inputs keeps ~25% of it; an evolved scorer learns from the attention spectrogram which tokens the
model keeps coming back to.

    python examples/evolve_namm.py --generations 8 --out /tmp/namm-evolve
    python examples/evolve_namm.py --generations 12 --out /tmp/namm-evolve --resume   # continue
    torchrun --nproc_per_node 2 examples/evolve_namm.py --out /tmp/namm-evolve2       # 2 processes

(the same as ``tokenmem evolve --task synthetic --generations 8 --out DIR``).
"""

import argparse
import os

import torch

from tokenmem import TokenMemory
from tokenmem.plugins.namm import NAMM
from tokenmem.plugins.namm.evolve import SyntheticTask, evolve
from tokenmem.plugins.namm.scorer import initial_params

parser = argparse.ArgumentParser()
parser.add_argument("--generations", type=int, default=8)
parser.add_argument("--population", type=int, default=32)
parser.add_argument("--sigma", type=float, default=0.065)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="namm-evolve")
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()

task = SyntheticTask()
result = evolve(task, args.out, generations=args.generations, population=args.population, sigma=args.sigma,
                seed=args.seed, resume=args.resume)

if int(os.environ.get("RANK", "0")) == 0:
    print("fitness of the CMA-ES mean by generation:", " ".join(f"{v:.3f}" for v in result.mean_curve))
    print(f"best member seen: {result.best_fitness:.3f}; full-cache reference: {result.reference}")

    # the saved scorer, on prompts it never saw, against scorers that ignore their inputs
    namm = NAMM.from_file(args.out)
    model = task.load_model()
    held_out = SyntheticTask(prompt_seed=100, num_prompts=8)
    torch.set_num_threads(1)

    def score(evictor):
        interval = namm.config.interval
        return held_out.score(held_out.run(model, lambda: TokenMemory(model, evictor, budget=held_out.budget, interval=interval)))

    print("held-out prompts (share of the next queries' attention kept in memory; full cache = 1.0):")
    for name, evictor in [("evolved NAMM", namm), ("initial NAMM (all tokens score 1)", namm.with_params(initial_params(namm.config))),
                          ("random", "random"), ("recent", "recent"), ("h2o", "h2o")]:
        print(f"  {name:<34} {score(evictor):.3f}")
