"""Decision Transformer under a bounded memory: normalised scores per evictor, rollout speed, what NAMM keeps.

Model: the shipped Hopper DT (``tokenmem/envs/models/hopper-medium-dt``, trained by
``python -m tokenmem.envs.train_dt``) or ``--model PATH``. Episode ``i`` uses seed ``seed + i``, and
``--batch`` episodes run together (one batch through the memory). Reported:

1. quality: D4RL-normalised score (mean ± std over ``--episodes`` seeds) of the reference loop (the
   official transformers example: last K steps re-encoded every step), the cached rollout with the full
   history, and every cached evictor (``--evictors``) at the same ``--budget`` (60 tokens = 20 timesteps =
   the reference's K), with the tokens the memory holds (mean over steps, and the maximum): with the
   adapter's default ``decode_span=3`` a step is a decode step and the memory evicts once ``interval`` new
   tokens (default 9, three timesteps) have accumulated, so it holds up to ``budget + interval - 1``; with
   ``--decode-span 1`` it evicts after every step (held <= budget). NAMM uses ``--namm-scorer``: by default the shipped scorer evolved on language
   (``NAMM.pretrained("language")``), unchanged; ``initial`` for the untrained initial scorer;
2. speed: model steps per second (policy time only, no physics; batch 1, random states) at steady state (the
   median of ``--speed-repeats`` rounds of ``--speed-steps`` steps, the policies taking turns in each round),
   for the reference re-encoding K steps vs the cache holding K steps, and the reference re-encoding
   ``--history`` steps vs the cache holding ``--history`` steps (the target: cached ``recent`` with eviction
   >= 5x there), the cache as ``recent`` with the adapter's default (``decode_span=3``, evicting every 9 new
   tokens) and with ``decode_span=1`` (evicting one timestep at every step), and full (no eviction); once per
   ``--threads`` value (``--speed-only`` skips 1);
3. a plot (``--plot``) of the token types (return / state / action) and ages (timesteps before the current
   one) NAMM keeps, over every eviction of its rollouts.

    python benchmarks/decision.py [--model PATH] [--episodes 10] [--budget 60] [--namm-scorer language|initial|DIR]
                                  [--history 200] [--threads 1 2] [--decode-span 3] [--speed-only]
                                  [--out results.json] [--plot namm_kept.png]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np
import torch

from tokenmem.evictor_list import add_evictors_argument


def quality(adapter, args, evictor, budget=None, label=None, record_kept=None) -> dict:
    from tokenmem.adapters.decision import CachedPolicy, ReferencePolicy
    from tokenmem.envs.rollout import rollout
    from tokenmem.envs import make_env

    returns, lengths, scores, seconds, held = [], [], [], 0.0, []
    for first in range(0, args.episodes, args.batch):
        seeds = list(range(args.seed + first, args.seed + min(args.episodes, first + args.batch)))
        if evictor == "reference":
            policy = ReferencePolicy(adapter)
        else:
            span = {} if args.decode_span is None else {"decode_span": args.decode_span}
            policy = _held(CachedPolicy(adapter, evictor, budget, args.interval, **span), held)
            if record_kept is not None:
                policy = _recording(policy, record_kept)
        result = rollout(adapter, policy, [make_env(args.env) for _ in seeds], seeds, max_steps=args.max_steps)
        returns += result.returns.tolist()
        lengths += result.lengths.tolist()
        scores += result.scores.tolist()
        seconds += result.seconds
    row = {"config": label or evictor, "budget": budget, "score_mean": float(np.mean(scores)),
           "score_std": float(np.std(scores)), "return_mean": float(np.mean(returns)),
           "length_mean": float(np.mean(lengths)), "env_steps_per_second": float(np.sum(lengths) / seconds),
           "held_mean": float(np.mean(held)) if held else None, "held_max": max(held) if held else None,
           "returns": returns}
    print(f"  {row['config']:<28} score {row['score_mean']:6.1f} ± {row['score_std']:5.1f}   "
          f"length {row['length_mean']:6.1f}" + (f"   held {row['held_mean']:.1f} (max {row['held_max']})"
                                                  if held else ""), flush=True)
    return row


def _held(policy, held: list):
    """Wrap a CachedPolicy so that every step appends the tokens layer 0 holds (slots, every row alive or not)."""
    act = policy.act

    def act_and_count(*a, **k):
        out = act(*a, **k)
        held.append(int(policy.memory.layers[0].held))
        return out

    policy.act = act_and_count
    return policy


def _recording(policy, kept: dict):
    """Wrap a CachedPolicy so that every eviction adds the kept tokens' modality and age to ``kept``."""
    from tokenmem.meta import MODALITY_NAMES

    start = policy.start

    def start_and_hook(batch):
        start(batch)
        memory = policy.memory
        evict = memory.evict_layer

        def evict_and_count(layer, keep):
            evict(layer, keep)
            meta = layer.meta
            valid = meta.valid
            now = int(meta.segment[valid].max()) if bool(valid.any()) else 0
            for code, count in Counter(meta.modality[valid].tolist()).items():
                kept["modality"][MODALITY_NAMES[code]] += count
            for age, count in Counter((now - meta.segment[valid]).tolist()).items():
                kept["age"][age] += count

        memory.evict_layer = evict_and_count

    policy.start = start_and_hook
    return policy


def speed(adapter, plain_model, history: int, steps: int, seed: int, repeats: int = 3,
          intervals: tuple[int, ...] = ()) -> dict:
    """Steady-state policy steps/s: the reference re-encoding ``history`` steps vs the cache holding
    ``history`` steps: ``recent`` at a budget of ``3 * history`` tokens with the adapter's default
    (``decode_span=3``: it evicts once 9 new tokens have accumulated) and with ``decode_span=1`` (it evicts one
    timestep at every step), and the full cache (no eviction; it grows from ``history`` steps by ``steps`` per round).
    Every policy is timed for ``steps`` steps in each of ``repeats`` rounds, the policies taking turns within a
    round (so a change of machine load hits them alike); each figure is the median over the rounds. ``intervals``
    adds one ``recent`` policy per interval (``decode_span=3``), keys ``cached_iv<N>``."""
    from tokenmem.adapters.decision import CachedPolicy, ReferencePolicy

    g = torch.Generator().manual_seed(seed)
    states = torch.randn(history + steps * repeats, 1, adapter.state_dim, generator=g)
    alive = torch.ones(1, dtype=torch.bool)
    rtg = torch.full((1,), 3.6)
    out = {"history": history, "steps": steps, "repeats": repeats}
    policies = (("reference", ReferencePolicy(adapter, context=history, model=plain_model)),
                ("cached", CachedPolicy(adapter, "recent", budget=3 * history)),  # the default: decode_span=3
                ("cached_every", CachedPolicy(adapter, "recent", budget=3 * history, decode_span=1)),
                ("cached_full", CachedPolicy(adapter, "full")),
                *((f"cached_iv{iv}", CachedPolicy(adapter, "recent", budget=3 * history, interval=iv, decode_span=3))
                  for iv in intervals))
    for _, policy in policies:
        policy.start(1)
        for t in range(history):  # fill the window / the memory (not timed)
            policy.act(t, rtg, states[t], alive)
    rates = {name: [] for name, _ in policies}
    for r in range(repeats):
        first = history + r * steps
        for name, policy in policies:
            t0 = time.perf_counter()
            for t in range(first, first + steps):
                policy.act(t, rtg, states[t], alive)
            rates[name].append(steps / (time.perf_counter() - t0))
    for name, values in rates.items():
        out[name] = float(np.median(values))
        out[name + "_rounds"] = values
    for name, _ in policies[1:]:  # cached -> speedup, cached_full -> speedup_full, cached_iv9 -> speedup_iv9, ...
        out[name.replace("cached", "speedup", 1)] = out[name] / out["reference"]
    print(f"  history {history:>4} steps: reference {out['reference']:7.1f} steps/s, cached recent "
          f"{out['cached']:7.1f} ({out['speedup']:.2f}x), evicting every step {out['cached_every']:7.1f} "
          f"({out['speedup_every']:.2f}x), cached full {out['cached_full']:7.1f} "
          f"({out['speedup_full']:.2f}x)", flush=True)
    return out


def plot(kept: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written (the counts are in the JSON output)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = ["return", "state", "action"]
    total = sum(kept["modality"].values()) or 1
    a.bar(names, [kept["modality"][n] / total for n in names], color=["#4c72b0", "#55a868", "#c44e52"])
    a.set_ylabel("share of kept tokens")
    a.set_title("token types NAMM keeps")
    ages = sorted(kept["age"])
    b.bar(ages, [kept["age"][x] for x in ages], width=1.0, color="#8172b2")
    b.set_xlabel("age (timesteps before the current one)")
    b.set_ylabel("kept tokens (all evictions, layers, heads)")
    b.set_title("timesteps NAMM keeps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=60)
    p.add_argument("--interval", type=int, default=None,
                   help="evictions every N new tokens (default: the adapter's 9 with decode_span > 1, else the evictor's)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--namm-scorer", default="language", help="NAMM scorer: a shipped name, a directory, or 'initial' "
                   "(default: the shipped language-trained scorer)")
    p.add_argument("--history", type=int, default=200)
    p.add_argument("--speed-steps", type=int, default=100, help="timed steps per policy and round")
    p.add_argument("--speed-repeats", type=int, default=3, help="rounds (the table gives the median)")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="torch threads; several values repeat the speed table at each (quality runs at the first)")
    p.add_argument("--decode-span", type=int, default=None,
                   help="the quality rows' decode_span (default: the adapter's, 3 = one timestep counts as a decode "
                        "step, eviction every --interval tokens, 9 unless given; 1 = evict after every step)")
    p.add_argument("--speed-only", action="store_true", help="skip the quality table")
    p.add_argument("--speed-intervals", type=int, nargs="*", default=[],
                   help="also time cached recent with decode_span=3 at each of these intervals (a column each)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    add_evictors_argument(p, exclude=("separator",))  # separators are text tokens: none in a trajectory
    p.add_argument("--plot", default=None, help="write the NAMM plot (PNG)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads[0])

    from transformers import DecisionTransformerModel

    from tokenmem.adapters.decision import DecisionAdapter
    from tokenmem.envs import shipped_dt_path
    from tokenmem.plugins.namm import NAMM

    path = str(args.model or shipped_dt_path())
    adapter = DecisionAdapter.from_pretrained(path)
    adapter.env_id = adapter.env_id or args.env
    last = args.history + args.speed_steps * args.speed_repeats  # the largest timestep the speed rows reach
    if last > adapter.max_ep_len:
        raise SystemExit(f"--history {args.history} + --speed-steps {args.speed_steps} x --speed-repeats "
                         f"{args.speed_repeats} = {last} timesteps, more than the model's max_ep_len "
                         f"({adapter.max_ep_len}): lower one of them")
    plain = DecisionTransformerModel.from_pretrained(path).eval()  # sdpa, never prepared: the reference's model
    namm = NAMM.load(args.namm_scorer)
    namm_label = {"language": "namm (language-trained scorer)", "initial": "namm (initial scorer)"}.get(
        args.namm_scorer, f"namm ({args.namm_scorer})")
    kept = {"modality": Counter(), "age": Counter()}

    print(f"quality: {args.env}, {args.episodes} episodes from seed {args.seed}, budget {args.budget} tokens "
          f"(= {args.budget // 3} timesteps), reference K={adapter.context}", flush=True)
    rows = [] if args.speed_only else [quality(adapter, args, "reference", label=f"reference (K={adapter.context})")]
    for name in [] if args.speed_only else args.evictors:
        if name == "full":
            rows.append(quality(adapter, args, "full", label="cached full history"))
        elif name == "namm":
            rows.append(quality(adapter, args, namm, args.budget, label=f"cached {namm_label}", record_kept=kept))
        else:
            rows.append(quality(adapter, args, name, args.budget, label=f"cached {name}"))

    print("speed (policy only, batch 1, steady state):", flush=True)
    speeds = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f" torch threads: {threads}", flush=True)
        for history in (adapter.context, args.history):
            row = speed(adapter, plain, history, args.speed_steps, args.seed, args.speed_repeats,
                        tuple(args.speed_intervals))
            speeds.append(dict(row, threads=threads))
    torch.set_num_threads(args.threads[0])

    print()
    if rows:
        span = "the adapter's default, 3" if args.decode_span is None else args.decode_span
        print(f"decode_span: {span}; held: tokens layer 0 holds per row, mean over steps (max)")
        print(f"| config | budget | normalised score | mean return | mean length | held |")
        print(f"|---|---|---|---|---|---|")
    for r in rows:
        budget = "all" if r["budget"] is None and not r["config"].startswith("reference") else (
            f"K={adapter.context}" if r["config"].startswith("reference") else r["budget"])
        held = "-" if r["held_mean"] is None else f"{r['held_mean']:.1f} ({r['held_max']})"
        print(f"| {r['config']} | {budget} | {r['score_mean']:.1f} ± {r['score_std']:.1f} | {r['return_mean']:.1f} "
              f"| {r['length_mean']:.1f} | {held} |")
    print()
    print("torch threads: the same for every column of a row")
    print("| threads | history (timesteps) | reference steps/s | cached recent, default (decode_span=3: evicts every "
          "9 tokens) | ratio | cached recent, decode_span=1 (evicts every step) | ratio "
          "| cached full steps/s (no eviction) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in speeds:
        print(f"| {s['threads']} | {s['history']} | {s['reference']:.1f} | {s['cached']:.1f} | {s['speedup']:.2f}x "
              f"| {s['cached_every']:.1f} | {s['speedup_every']:.2f}x | {s['cached_full']:.1f} | {s['speedup_full']:.2f}x |")
    if args.speed_intervals:
        print()
        print("cached recent with decode_span=3 at each interval: steps/s (ratio to the reference of the same row)")
        print("| threads | history (timesteps) | " + " | ".join(f"interval {iv}" for iv in args.speed_intervals) + " |")
        print("|---|---|" + "---|" * len(args.speed_intervals))
        for s in speeds:
            print(f"| {s['threads']} | {s['history']} | " + " | ".join(
                f"{s[f'cached_iv{iv}']:.1f} ({s[f'speedup_iv{iv}']:.2f}x)" for iv in args.speed_intervals) + " |")
    kept_json = {"modality": dict(kept["modality"]), "age": {str(k): v for k, v in sorted(kept["age"].items())}}
    if args.plot:
        plot(kept, args.plot)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": path, "settings": vars(args), "quality": rows, "speed": speeds,
                       "namm_kept": kept_json}, f, indent=2)
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
