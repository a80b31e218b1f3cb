"""Memory bank (MemLong-style, tokenmem/bank): retrieval exact match with and without the bank, on held-out data.

What is measured
----------------
The shipped standard-library Llama (``tokenmem/zoo/models/stdlib-llama``, the real ``from_pretrained``) runs
two held-out retrieval sets (:class:`tokenmem.zoo.lm_tasks.RetrievalTask`): a value ``_SECRET_7 = 48213``
planted near the start of real code, 256-1,536 tokens of code, then ``assert _SECRET_7 == `` -> the value
(exact match of its 5 digits, greedy), 12 prompts per distance:

* ``eval``: the eval split (standard-library files the model never trained on, none of them in the evolve split);
* ``thirdparty``: the same construction on ``transformers``' own sources (:mod:`tokenmem.zoo.thirdparty`), code
  from outside the standard library.

The bank's defaults (``tokenmem.bank.Bank``) were chosen on the evolve files only, by ``benchmarks/bank_select.py``
(results: ``benchmarks/results/bank_select.md``); this benchmark refuses to report on a split drawn from the
evolve files, and nothing here feeds back into a default.

Every prompt is fed as the language report feeds it: chunks of 128 tokens, the memory evicting after each chunk
once over budget (a fraction of the tokens seen), then greedy decoding; the first answer digit comes from the last
prefill chunk's logits, so retrieval is refreshed on every prefill chunk.

Rows per set: ``full`` (nothing evicted), then every evictor x bank off / on x budget 25% / 50%, and for
``--matched`` evictors (default sink, h2o, namm) a control per bank row: the evictor alone at a budget equal to
what the bank row attended ("matched budget"), so the bank's gain is not just the extra tokens it brings back.
Columns: exact match overall and per distance (x100); "value in view": the share of (prompt, layer, KV
head) whose last prefill call attended every digit of the planted value (live in the cache or retrieved
from the bank); KV held: the fraction of the tokens seen held at the end of the prompt (mean over layers);
attended: (held + retrieved) / seen in the last prefill call, i.e. what the attention actually saw (the bank
brings ``retrieve x chunk_size`` tokens back per layer and KV head); bank MiB: host + spilled bytes of the
bank at the end of the prompt (mean over prompts); s/prompt: wall time per prompt.

The shift-position rows (eval set) run ``sink`` with ``positions="shift"`` without the bank and with the
retrieved keys placed before the cache (``-r .. -1``) or all at position 0 (MemLong's choice).

Usage::

    python benchmarks/bank.py                           # both held-out sets, every evictor (shipped model and scorer)
    python benchmarks/bank.py --quick                   # 2 prompts per distance
    python benchmarks/bank.py --splits eval --evictors sink h2o --skip-shift
    python benchmarks/bank.py --model DIR --scorer untrained --quick   # smoke test on any local model
    python benchmarks/bank.py --json out.json --out report.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

MATCHED = ("sink", "h2o", "namm")  # evictors that get a matched-budget control row by default
SPLITS = ("eval", "thirdparty")
BUDGETS = (0.25, 0.5)
CHUNK = 128  # prefill chunk (as the language report)


def value_positions(tok, record) -> list[int] | None:
    """Stream positions of the planted value's tokens (None when the prompt's tokens cannot be matched)."""
    text, value = record["text"], record["answer"]
    name = text.rsplit("assert ", 1)[1].split(" == ")[0]
    start = text.index(f"{name} = {value}") + len(name) + 3
    before = tok(text[:start], add_special_tokens=False)["input_ids"]
    upto = tok(text[: start + len(value)], add_special_tokens=False)["input_ids"]
    if record["input_ids"][: len(upto)] != upto or len(upto) <= len(before):
        return None
    return list(range(len(before), len(upto)))


class ViewRecorder:
    """Wraps ``memory.attend``: per layer, the positions the latest call attended (live, per KV head) and
    the positions the bank retrieved for it."""

    def __init__(self, memory):
        from tokenmem.meta import FLAGS, PAD, POSITION

        self.views: dict[int, tuple[list[set], int, int]] = {}
        original = memory.attend

        def attend(layer_idx, query, *args, **kwargs):
            layer = memory.layers[layer_idx]
            q, attended = query.shape[2], layer.held  # held now includes this call's tokens
            meta = layer.meta_buffer[0, :, : layer.held - q]  # batch 1: [h, n, F] before this call's tokens
            live = [set(meta[h, (meta[h, :, FLAGS] & PAD) == 0, POSITION].tolist()) for h in range(meta.shape[0])]
            out = original(layer_idx, query, *args, **kwargs)
            bank = memory.bank.layers.get(layer_idx) if memory.bank is not None else None
            retrieved = 0
            if bank is not None and bank.active is not None:
                pos = bank.active.positions[0]
                for h, heads in enumerate(live):
                    heads |= set(pos[h][pos[h] >= 0].tolist())
                retrieved = int((pos >= 0).sum(-1).float().mean())
            self.views[layer_idx] = (live, retrieved, attended)
            return out

        memory.attend = attend


def run_config(model, tok, records, factory, max_new: int) -> dict:
    from tokenmem.compat import cache_kwargs
    from tokenmem.zoo.lm_tasks import retrieved_value

    hits, in_view, held, attended, bank_mib, seconds = [], [], [], [], [], []
    by_distance: dict[int, list[float]] = {}
    for rec in records:
        ids = torch.tensor(rec["input_ids"])[None]
        memory = factory()
        recorder = ViewRecorder(memory)
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, ids.shape[1], CHUNK):
                logits = model(input_ids=ids[:, s : s + CHUNK], **cache_kwargs(model, memory), use_cache=True,
                               logits_to_keep=1).logits[:, -1]
            views = dict(recorder.views)
            stats = memory.stats()
            out = []
            for i in range(max_new):
                nxt = logits.argmax(-1, keepdim=True)
                out.append(int(nxt))
                if i + 1 < max_new:
                    logits = model(input_ids=nxt, **cache_kwargs(model, memory), use_cache=True,
                                   logits_to_keep=1).logits[:, -1]
        seconds.append(time.perf_counter() - t0)
        hit = float(retrieved_value(tok.decode(out)) == rec["answer"])
        hits.append(hit)
        by_distance.setdefault(rec["distance"], []).append(hit)
        seen = ids.shape[1]
        held.append(sum(stats["held"]) / (len(stats["held"]) * seen))
        attended.append(statistics.mean((n + r) / seen for _, r, n in views.values()))
        bank_mib.append(stats["bank"]["bytes"] / 2**20 if "bank" in stats else 0.0)
        positions = value_positions(tok, rec)
        if positions is not None:
            for live, _, _ in views.values():
                in_view += [float(all(p in heads for p in positions)) for heads in live]
    return {"em": 100 * statistics.mean(hits),
            "em_by_distance": {str(d): 100 * statistics.mean(v) for d, v in sorted(by_distance.items())},
            "value_in_view": 100 * statistics.mean(in_view) if in_view else None,
            "kv_held": statistics.mean(held), "attended": statistics.mean(attended),
            "bank_mib": statistics.mean(bank_mib), "s_per_prompt": statistics.mean(seconds), "prompts": len(records)}


def run_public_api(model, tok, records, evictor: str, budget: float, max_new: int) -> dict:
    """The user's path: ``TextAdapter.generate(text, memory=TokenMemory(model, evictor, budget=..., bank=True),
    prefill_chunk=128)`` on each prompt's text (the adapter tokenizes it), exact match of the answer."""
    import tokenmem
    from tokenmem.adapters import TextAdapter
    from tokenmem.zoo.lm_tasks import retrieved_value

    adapter = TextAdapter(model, tok)
    hits, seconds, by_distance = [], [], {}
    for rec in records:
        t0 = time.perf_counter()
        memory = tokenmem.TokenMemory(model, evictor, budget=budget, bank=True)
        out = adapter.generate(rec["text"], memory=memory, prefill_chunk=CHUNK, max_new_tokens=max_new)
        seconds.append(time.perf_counter() - t0)
        hit = float(retrieved_value(out.texts[0]) == rec["answer"])
        hits.append(hit)
        by_distance.setdefault(rec["distance"], []).append(hit)
    return {"em": 100 * statistics.mean(hits),
            "em_by_distance": {str(d): 100 * statistics.mean(v) for d, v in sorted(by_distance.items())},
            "value_in_view": None, "kv_held": None, "attended": None, "bank_mib": None,
            "s_per_prompt": statistics.mean(seconds), "prompts": len(records)}


def memory_factory(model, evictor, budget, bank, scorer, positions="original"):
    import tokenmem

    def factory():
        if evictor == "full":
            return tokenmem.TokenMemory(model, "full")
        chosen = scorer() if evictor == "namm" else evictor
        return tokenmem.TokenMemory(model, chosen, budget=budget, bank=bank, positions=positions)

    return factory


def table(rows: list[dict], extra: tuple[str, ...] = ()) -> list[str]:
    distances = sorted({int(d) for r in rows for d in r.get("em_by_distance", {})})
    head = (["method", "bank", *extra, "budget", "EM"] + [f"EM @{d}" for d in distances]
            + ["value in view %", "KV held", "attended", "bank MiB", "s/prompt"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt="{:.1f}"):
        return "n/a" if v is None else fmt.format(v)

    for r in rows:
        if "error" in r:
            continue
        by = r["em_by_distance"]
        bank = r["bank"] + (" (matched budget)" if r.get("control") else "")
        cells = ([r["method"], bank, *[str(r.get(e, "")) for e in extra],
                  "-" if r["budget"] is None else f"{r['budget']:.0%}", f(r["em"])]
                 + [f(by.get(str(d))) for d in distances]
                 + [f(r["value_in_view"]), f(r["kv_held"], "{:.3f}"), f(r["attended"], "{:.3f}"),
                    f(r["bank_mib"], "{:.2f}"), f(r["s_per_prompt"], "{:.2f}")])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def held_out_records(split: str, per_distance: int | None) -> list[dict]:
    """The retrieval prompts of a held-out ``split`` (the first ``per_distance`` of every distance); refuses a
    split drawn from the evolve files, on which the bank's defaults were chosen."""
    from tokenmem.errors import TokenmemError
    from tokenmem.zoo.lm_tasks import SPLIT_SOURCE, RetrievalTask

    if SPLIT_SOURCE.get(split) == "evolve":
        raise TokenmemError(f"the bank report runs on held-out sets only; {split!r} is drawn from the evolve files, "
                            f"on which benchmarks/bank_select.py chose the defaults: use {' or '.join(SPLITS)}")
    return first_per_distance(RetrievalTask(split=split).records, per_distance)


def first_per_distance(records: list[dict], per_distance: int | None) -> list[dict]:
    """The first ``per_distance`` records of every distance, in file order (all of them when None or 0)."""
    if not per_distance:
        return records
    kept, counts = [], {}
    for r in records:
        counts[r["distance"]] = counts.get(r["distance"], 0) + 1
        if counts[r["distance"]] <= per_distance:
            kept.append(r)
    return kept


def main(argv=None) -> int:
    from tokenmem.evictor_list import add_evictors_argument

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped stdlib Llama)")
    p.add_argument("--scorer", default=None,
                   help="NAMM scorer directory (default: the shipped language scorer); 'untrained' = NAMM's initial "
                        "scorer (smoke tests only)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), help="held-out sets (default: eval thirdparty)")
    add_evictors_argument(p, exclude=("full",))
    p.add_argument("--matched", nargs="*", default=list(MATCHED),
                   help="evictors that get a matched-budget control row (default: sink h2o namm)")
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    p.add_argument("--chunk-size", type=int, default=None, help="bank chunk size (default: Bank's)")
    p.add_argument("--retrieve", type=int, default=None, help="chunks retrieved (default: Bank's)")
    p.add_argument("--quick", action="store_true", help="2 prompts per distance")
    p.add_argument("--per-distance", type=int, default=None, help="prompts per distance (default: all)")
    p.add_argument("--skip-shift", action="store_true", help="skip the shift-mode placement rows")
    p.add_argument("--api", action="store_true",
                   help="add sink + bank rows run through the public TextAdapter.generate(..., prefill_chunk=128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-full", dest="full", action="store_false", help="skip the full-cache row")
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--merge", nargs="+", default=None,
                   help="merge JSON files written by --json (e.g. a run without namm and one with "
                        "--evictors namm --no-full --skip-shift) into one report; a later file's rows of a method "
                        "replace that method's earlier rows on the same held-out set")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(x).read_text()) for x in args.merge]
        meta, rows, shifts = merge_parts(parts, args.merge)
        order = {name: i for i, name in enumerate(["full", *args.evictors])}
        rows = sorted(rows, key=lambda r: (r.get("split", "eval"), r["_block"] is not None, r["_block"] or 0.0,
                                           order.get(r["method"], len(order))))
        for r in rows:
            del r["_block"]
        return _finish(rows, shifts, meta, args)
    per = 2 if args.quick else args.per_distance
    sets = {split: held_out_records(split, per) for split in args.splits}  # refused before any model is loaded

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmem.bank import Bank
    from tokenmem.zoo import stdlib_lm_path
    from tokenmem.zoo.planting import VALUE_DIGITS

    torch.set_num_threads(args.threads)
    model_path = args.model or str(stdlib_lm_path())
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path)

    def scorer():
        from tokenmem.plugins.namm import NAMM

        if args.scorer == "untrained":
            return NAMM()
        return NAMM.from_file(args.scorer) if args.scorer else NAMM.pretrained("language")

    overrides = {k: v for k, v in (("chunk_size", args.chunk_size), ("retrieve", args.retrieve)) if v is not None}
    t_start = time.perf_counter()
    rows, shifts = [], []

    def run(split, method, budget, bank, positions="original", **labels):
        row = {"split": split, "method": method, "bank": "on" if bank else "off", "budget": budget, **labels}
        try:
            factory = memory_factory(model, method, budget, bank, scorer, positions)
            row.update(run_config(model, tok, sets[split], factory, VALUE_DIGITS))
        except Exception as exc:  # e.g. an evictor that cannot run on this model: reported, not hidden
            row["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(row), flush=True)
        return row

    for split in sets:
        if args.full:
            rows.append(run(split, "full", None, None))
        for budget in args.budgets:
            for ev in args.evictors:
                rows.append(run(split, ev, budget, None))
                rows.append(run(split, ev, budget, Bank(**overrides)))
                if ev in args.matched and "attended" in rows[-1]:  # control: no bank, budget = what the bank row attended
                    matched = min(1.0, round(rows[-1]["attended"], 2))
                    rows.append(run(split, ev, matched, None, control="matched"))
            if args.api:
                row = {"split": split, "method": "sink via TextAdapter.generate", "bank": "on", "budget": budget}
                row.update(run_public_api(model, tok, sets[split], "sink", budget, VALUE_DIGITS))
                print(json.dumps(row), flush=True)
                rows.append(row)
    if not args.skip_shift and "eval" in sets:
        for budget in args.budgets:
            shifts.append(run("eval", "sink", budget, None, "shift", placement="-"))
            for placement in ("before", "zero"):
                shifts.append(run("eval", "sink", budget, Bank(placement=placement, **overrides), "shift",
                                  placement=placement))
    sample = Bank(**overrides)
    meta = {"date": datetime.date.today().isoformat(), "model": model_path,
            "prompts": {split: len(records) for split, records in sets.items()},
            "bank": f"chunk_size={sample.chunk_size}, retrieve={sample.retrieve}, retrieve_every={sample.retrieve_every}, "
                    f"representative={sample.representative}, recent_queries={sample.recent_queries}",
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "wall_s": round(time.perf_counter() - t_start, 1)}
    return _finish(rows, shifts, meta, args)


def merge_parts(parts: list[dict], names: list[str]) -> tuple[dict, list[dict], list[dict]]:
    """``--merge``: the rows of several ``--json`` files in one report. A later file that has rows of a method on a
    held-out set replaces every earlier row of that method on that set (its bank on/off rows and its matched-budget
    controls), so one evictor re-run (``--evictors namm --no-full --skip-shift``) takes the place of its old rows;
    the report's meta names each file that replaced rows. Returns ``(meta, rows tagged with their block, shift rows)``."""
    meta = dict(parts[0]["meta"], wall_s=round(sum(d["meta"]["wall_s"] for d in parts), 1))
    def method(r):
        return r.get("split", "eval"), r["method"]

    def placement(r):
        return *method(r), r.get("placement")

    rows, shifts, replaced = [], [], []
    for name, part in zip(names, parts):
        new = _with_blocks(part["rows"])
        taken = {method(r) for r in new}
        dropped = {r["method"] for r in rows if method(r) in taken}
        if dropped:
            replaced.append(f"{', '.join(sorted(dropped))} rows from {Path(name).name} ({part['meta']['date']})")
        rows = [r for r in rows if method(r) not in taken] + new
        taken = {placement(r) for r in part["shift"]}
        shifts = [r for r in shifts if placement(r) not in taken] + part["shift"]
    if replaced:
        meta["replaced"] = replaced
    return meta, rows, shifts


def _with_blocks(rows: list[dict]) -> list[dict]:
    """Tag each main row with the budget of its block (a matched-budget control row follows the bank row it
    controls and has another budget), so merged rows sort by block and keep off / on / control together."""
    block = None
    for r in rows:
        if not r.get("control"):
            block = r["budget"]
        r["_block"] = block
    return rows


SET_TITLES = {"eval": "eval split (standard-library files never trained on)",
              "thirdparty": "third-party set (transformers' sources, code from outside the standard library)"}


def _finish(rows, shifts, meta, args) -> int:
    """Write the markdown report (stdout, ``--out``) and the rows (``--json``)."""
    prompts = meta["prompts"] if isinstance(meta["prompts"], dict) else {"eval": meta["prompts"]}
    text = [f"## Memory bank: retrieval exact match on held-out data ({meta['date']})", "",
            f"Model `{meta['model']}`, prefill chunks of {CHUNK}; bank defaults {meta['bank']}, chosen on the evolve "
            f"files by benchmarks/bank_select.py; {meta['machine']}; torch {meta['torch']}, "
            f"transformers {meta['transformers']}; wall {meta['wall_s']} s.", ""]
    if meta.get("replaced"):
        text += ["Merged with `--merge`; a later file's rows of a method replace that method's earlier rows: "
                 + "; ".join(meta["replaced"]) + ".", ""]
    for split in prompts:
        block = [r for r in rows if r.get("split", "eval") == split]
        if block:
            text += [f"### {SET_TITLES.get(split, split)}: {prompts[split]} prompts", ""]
            text += table(block) + [""]
            full = next((r for r in block if r["method"] == "full" and "em" in r), None)
            if full and full["em"]:
                ratios = [f"{100 * r['em'] / full['em']:.0f}% at {r['budget']:.0%} KV" for r in block
                          if r["method"] == "sink" and r["bank"] == "on" and "em" in r]
                if ratios:
                    text += [f"sink + bank as a share of the full cache's exact match: {', '.join(ratios)}.", ""]
    if shifts:
        text += ["### Shift positions: where retrieved keys go (eval set, sink + bank, positions=\"shift\")", ""]
        text += table(shifts, ("placement",)) + [""]
    errors = [r for r in rows + shifts if "error" in r]
    if errors:
        text += ["Not run:"] + [f"- {r.get('split', 'eval')}: {r['method']} bank {r['bank']} at "
                                f"{'-' if r['budget'] is None else format(r['budget'], '.0%')}: {r['error']}"
                                for r in errors]
    report = "\n".join(text) + "\n"
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "shift": shifts, "meta": meta}, indent=1))
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
