"""What the NAMM v2 fitness rewards on retrieval, answer token by answer token (evolve split: an analysis, not a result).

The v2 fitness scores a retrieval prompt by ``exp(mean logp_memory - mean logp_full)`` over the planted value's
answer tokens (:class:`tokenmem.plugins.namm.likelihood.AnswerLikelihoodTask`), while the eval tables score exact
match. This script streams the 32 retrieval prompts of the fitness (128-token chunks, eviction every 128 tokens, as
in the evolution) under each evictor and reports, per budget:

- ``fitness``: the fitness's retrieval score (mean over prompts of the ratio above);
- ``first-token ratio``: the same ratio for the answer's first token alone (the token that says *which* value);
- ``first token right``: share of prompts whose first answer token is the argmax after the streamed prompt;
- ``all tokens right``: share whose every answer token is the argmax, teacher-forced (greedy decoding's exact
  match);
- the full cache's values on the same prompts for reference.

    python benchmarks/namm_fitness_tokens.py [--evictors language keydiff h2o recent] [--limit N] [--out out.md]
                                             [--version v3]   # the v3 fitness's retrieval-early prompts
"""

from __future__ import annotations

import argparse
import json
import math
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evictors", nargs="+", default=["language", "keydiff", "h2o", "recent"],
                   help="registered evictor names, or NAMM scorers (language, language-v1, a directory)")
    p.add_argument("--limit", type=int, default=None,
                   help="the first N retrieval prompts (default all 32; v3's file lists its distances in order, 8 "
                        "each, so N <= 8 measures only distance 256)")
    p.add_argument("--version", choices=("v2", "v3"), default="v2",
                   help="whose fitness prompts: v2's retrieval (default) or v3's retrieval-early")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from tokenmem.compat import cache_kwargs
    from tokenmem.evictor_list import registered
    from tokenmem.memory import TokenMemory
    from tokenmem.plugins.namm import NAMM
    from tokenmem.zoo import namm_fitness
    from tokenmem.zoo.evolve_language import INTERVAL

    torch.set_num_threads(args.threads)
    tasks = [t for t in namm_fitness.tasks(None, limit=args.limit, batch_size=4, version=args.version)
             if t.name.startswith("retrieval")]
    model = tasks[0].model

    @torch.no_grad()
    def answer_logp(task, make_memory):
        """Per prompt ``[A]`` log-probabilities of the answer tokens and whether each is the argmax."""
        out = []
        for prompt, answer in zip(task.prompts, task.answers):
            memory = make_memory()
            ids = prompt[None]
            for s in range(0, ids.shape[1], task.chunk):
                last = model(input_ids=ids[:, s : s + task.chunk], **cache_kwargs(model, memory), use_cache=True,
                             logits_to_keep=1).logits[:, -1]
            logits = last[:, None]
            if answer.numel() > 1:
                rest = model(input_ids=answer[None, :-1], **cache_kwargs(model, memory), use_cache=True).logits
                logits = torch.cat([logits, rest], dim=1)
            logp = torch.log_softmax(logits[0].float(), -1)
            out.append((logp.gather(-1, answer[:, None])[:, 0], logp.argmax(-1) == answer))
        return out

    rows = []
    for task in tasks:
        t0 = time.perf_counter()
        full = answer_logp(task, lambda: TokenMemory(model, "full"))
        print(f"{task.name}: full cache {time.perf_counter() - t0:.0f} s", flush=True)
        for name in ["full"] + args.evictors:
            evictor = name if name in registered() else NAMM.load(name)
            t0 = time.perf_counter()
            mine = full if name == "full" else answer_logp(
                task, lambda: TokenMemory(model, evictor, budget=task.budget, interval=INTERVAL))
            n = len(mine)
            row = {
                "task": task.name, "evictor": name,
                "fitness": sum(math.exp(float(m.mean() - f.mean())) for (m, _), (f, _) in zip(mine, full)) / n,
                "first_token_ratio": sum(math.exp(float(m[0] - f[0])) for (m, _), (f, _) in zip(mine, full)) / n,
                "first_token_right": sum(bool(r[0]) for _, r in mine) / n,
                "all_tokens_right": sum(bool(r.all()) for _, r in mine) / n,
                "later_tokens_ratio": sum(math.exp(float(m[1:].mean() - f[1:].mean()))
                                          for (m, _), (f, _) in zip(mine, full)) / n,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(f"  {name:<10} fitness {row['fitness']:.3f}  first-token ratio {row['first_token_ratio']:.3f}  "
                  f"later tokens {row['later_tokens_ratio']:.3f}  first right {row['first_token_right']:.0%}  "
                  f"all right {row['all_tokens_right']:.0%}  ({row['seconds']:.0f} s)", flush=True)
    lines = ["NAMM fitness on retrieval, answer token by answer token (evolve split, the 32 fitness prompts; "
             "an analysis of what the fitness rewards, not a result)", "",
             "| task | evictor | fitness (mean-token ratio) | first-token ratio | later-token ratio | first token right "
             "| all tokens right |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['evictor']} | {r['fitness']:.3f} | {r['first_token_ratio']:.3f} | "
                     f"{r['later_tokens_ratio']:.3f} | {r['first_token_right']:.0%} | {r['all_tokens_right']:.0%} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
