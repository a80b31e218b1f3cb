"""Choosing the memory bank's defaults on the evolve split: a coordinate search over ``tokenmem.bank.Bank``'s options.

What is measured
----------------
The shipped standard-library Llama runs the ``select`` set of the retrieval task (48 prompts, 12 per distance
256 / 512 / 1,024 / 1,536, planted in the *evolve* files: ``tokenmem/zoo/data/lm_tasks/retrieval-select.jsonl``,
built by :func:`tokenmem.zoo.lm_tasks.build_select_file`) exactly as ``benchmarks/bank.py`` runs its held-out
sets: chunks of 128 tokens, the memory evicting after each chunk, greedy decoding of the 5-digit value.

The objective of a configuration is the mean exact match of ``sink`` + bank at 25% and 50% KV (the evictor
that keeps nothing of the middle, so every hit is the bank's). The search starts from the current defaults and
changes one option at a time over the values below, keeping a change only when it raises the objective (ties:
the current value); it sweeps the options until a sweep changes nothing (at most ``--sweeps``).

The tokens brought back per layer and KV head (``chunk_size x retrieve`` = 256) are not searched: they are the
device-memory bound the bank promises (``budget + interval + retrieve x chunk_size``), fixed before any
measurement; bringing back more would raise exact match by spending more memory, which is not a better rule.

* ``representative``: ``max`` / ``mean`` / ``top``;
* ``recent_queries``: the call's last 1 / 4 / 8 / 16 queries, or all of them;
* ``chunk_size x retrieve`` at 256 tokens brought back: 16 x 16, 32 x 8, 64 x 4, 128 x 2;
* ``retrieve_every``: 1 / 4 / 8 / 16 decode steps.

Only splits drawn from the evolve files can be read (:func:`selection_records` refuses ``eval`` and
``thirdparty``, by name or by path): the held-out tables of ``benchmarks/bank.py`` are never used to choose.

Usage::

    python benchmarks/bank_select.py --out benchmarks/results/bank_select.md --json benchmarks/results/bank_select.json
    python benchmarks/bank_select.py --per-distance 2 --sweeps 1     # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

BUDGETS = (0.25, 0.5)
EVICTOR = "sink"


def _bank_benchmark():
    spec = importlib.util.spec_from_file_location("bank_benchmark", Path(__file__).with_name("bank.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def selection_records(source: str = "select", per_distance: int | None = None) -> tuple[str, list[dict]]:
    """The retrieval prompts the bank's defaults may be chosen on: ``source`` is a split name or the path of a
    shipped task file; only splits drawn from the evolve files are accepted. Returns ``(split, records)``."""
    from tokenmem.errors import TokenmemError
    from tokenmem.zoo.lm_tasks import SPLIT_SOURCE, TASK_DIR, load_records

    split = source
    if "/" in source or source.endswith(".jsonl"):
        path = Path(source).resolve()
        known = {(TASK_DIR / f"retrieval-{s}.jsonl").resolve(): s for s in SPLIT_SOURCE}
        if path not in known:
            raise TokenmemError(f"bank default selection reads only the shipped evolve-split retrieval files, not {source}; "
                                f"use one of the splits {[s for s, v in SPLIT_SOURCE.items() if v == 'evolve']}")
        split = known[path]
    origin = SPLIT_SOURCE.get(split)
    if origin != "evolve":
        raise TokenmemError(
            f"bank default selection must not read the {split!r} split (drawn from the {origin or 'unknown'} files): "
            f"defaults are chosen on the evolve files only; use --split select (or evolve)")
    return split, _bank_benchmark().first_per_distance(load_records("retrieval", split), per_distance)


def candidates(axis: str, current: dict) -> list[dict]:
    """The configurations one step along ``axis`` from ``current`` (a dict of Bank options)."""
    if axis == "representative":
        return [dict(current, representative=r) for r in ("max", "mean", "top")]
    if axis == "recent_queries":
        return [dict(current, recent_queries=q) for q in (1, 4, 8, 16, None)]
    if axis == "chunk":
        return [dict(current, chunk_size=c, retrieve=256 // c) for c in (16, 32, 64, 128)]
    if axis == "retrieve_every":
        return [dict(current, retrieve_every=e) for e in (1, 4, 8, 16)]
    raise ValueError(axis)


AXES = ("representative", "recent_queries", "chunk", "retrieve_every")
OPTIONS = ("representative", "recent_queries", "chunk_size", "retrieve", "retrieve_every")


def key(config: dict) -> tuple:
    return tuple(config[k] for k in OPTIONS)


def label(config: dict) -> str:
    q = "all" if config["recent_queries"] is None else config["recent_queries"]
    return (f"{config['representative']}, last {q} queries, {config['chunk_size']} x {config['retrieve']}, "
            f"every {config['retrieve_every']}")


def search(evaluate, start: dict, sweeps: int = 2, log=print) -> tuple[dict, list[dict]]:
    """Coordinate search from ``start``: ``evaluate(config) -> objective`` (cached by configuration). Returns
    the chosen configuration and every evaluation in order."""
    seen: dict[tuple, float] = {}
    trail: list[dict] = []

    def score(config):
        k = key(config)
        if k not in seen:
            seen[k] = evaluate(config)
            trail.append({"config": dict(config), "objective": seen[k]})
            log(f"  {label(config)}: {seen[k]:.2f}")
        return seen[k]

    current = dict(start)
    for sweep in range(sweeps):
        changed = False
        for axis in AXES:
            best, best_score = current, score(current)
            for c in candidates(axis, current):
                s = score(c)
                if s > best_score:
                    best, best_score = c, s
            if key(best) != key(current):
                log(f"sweep {sweep + 1}, {axis}: {label(current)} -> {label(best)} ({best_score:.2f})")
                current, changed = best, True
        if not changed:
            break
    return current, trail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="select", help="evolve-file split to choose on: select (default) or evolve")
    p.add_argument("--model", default=None, help="model directory (default: the shipped stdlib Llama)")
    p.add_argument("--per-distance", type=int, default=None, help="prompts per distance (default: all)")
    p.add_argument("--sweeps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    split, records = selection_records(args.split, args.per_distance)  # refuses held-out data before any work

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmem.bank import Bank
    from tokenmem.zoo import stdlib_lm_path
    from tokenmem.zoo.planting import VALUE_DIGITS

    bench = _bank_benchmark()
    torch.set_num_threads(args.threads)
    model_path = args.model or str(stdlib_lm_path())
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    defaults = {k: getattr(Bank(), k) for k in OPTIONS}
    rows: list[dict] = []

    def evaluate(config: dict) -> float:
        ems = []
        for budget in BUDGETS:
            factory = bench.memory_factory(model, EVICTOR, budget, Bank(**config), None)
            row = {"config": label(config), "budget": budget,
                   **bench.run_config(model, tok, records, factory, VALUE_DIGITS)}
            rows.append(row)
            ems.append(row["em"])
        return sum(ems) / len(ems)

    t0 = time.perf_counter()
    full = bench.run_config(model, tok, records, bench.memory_factory(model, "full", None, None, None), VALUE_DIGITS)
    print(f"full cache on {split}: EM {full['em']:.1f}", flush=True)
    chosen, trail = search(evaluate, defaults, args.sweeps, log=lambda s: print(s, flush=True))
    meta = {"date": datetime.date.today().isoformat(), "model": model_path, "split": split, "prompts": len(records),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "transformers": transformers.__version__, "wall_s": round(time.perf_counter() - t0, 1)}
    by_key = {key(t["config"]): t["objective"] for t in trail}
    text = [f"## Memory bank: choosing the defaults on the {split} split ({meta['date']})", "",
            f"Model `{model_path}`, retrieval `{split}` set ({len(records)} prompts planted in the evolve files), "
            f"prefill chunks of 128; objective: mean exact match of {EVICTOR} + bank at "
            f"{' and '.join(f'{b:.0%}' for b in BUDGETS)} KV; full cache {full['em']:.1f}. {meta['machine']}; "
            f"torch {meta['torch']}, transformers {meta['transformers']}; wall {meta['wall_s']} s.", "",
            f"- previous defaults: {label(defaults)} -> {by_key[key(defaults)]:.2f}",
            f"- chosen: **{label(chosen)}** -> {by_key[key(chosen)]:.2f}", "",
            "| representative | recent queries | chunk size | retrieve | retrieve_every | tokens back | EM 25% | EM 50% | objective |",
            "|---|---|---|---|---|---|---|---|---|"]
    ems = {(r["config"], r["budget"]): r["em"] for r in rows}
    for t in trail:
        c = t["config"]
        cells = [c["representative"], "all" if c["recent_queries"] is None else str(c["recent_queries"]),
                 str(c["chunk_size"]), str(c["retrieve"]), str(c["retrieve_every"]), str(c["chunk_size"] * c["retrieve"]),
                 *(f"{ems[(label(c), b)]:.1f}" for b in BUDGETS), f"{t['objective']:.2f}"]
        text.append("| " + " | ".join(cells) + " |")
    report = "\n".join(text) + "\n"
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "full": full, "defaults": defaults, "chosen": chosen,
                                               "trail": trail, "rows": rows}, indent=1))
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
