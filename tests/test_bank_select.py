"""The memory bank's defaults are chosen on the evolve files only (benchmarks/bank_select.py, issue 19)."""

import pytest

from conftest import load_benchmark
from tokenmem.errors import TokenmemError
from tokenmem.zoo.lm_tasks import SPLIT_SOURCE, TASK_DIR, load_records


@pytest.fixture(scope="module")
def select():
    return load_benchmark("bank_select")


@pytest.mark.parametrize("source", ["eval", "thirdparty", str(TASK_DIR / "retrieval-eval.jsonl"),
                                    str(TASK_DIR / "retrieval-thirdparty.jsonl"), "my/own/retrieval.jsonl", "nosuch"])
def test_selection_refuses_every_split_not_drawn_from_the_evolve_files(select, source):
    with pytest.raises(TokenmemError, match="bank default selection"):
        select.selection_records(source)


def test_the_benchmark_refuses_a_held_out_split_before_loading_anything(select, monkeypatch):
    import transformers

    def boom(*a, **k):  # loading a model would mean the check came too late
        raise AssertionError("model loaded before the split was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(TokenmemError, match="'eval' split"):
        select.main(["--split", "eval"])


def test_the_select_set_is_drawn_from_the_evolve_files_only(select):
    from tokenmem.zoo.lm_tasks import _long_files

    split, records = select.selection_records(str(TASK_DIR / "retrieval-select.jsonl"))
    assert split == "select" and SPLIT_SOURCE[split] == "evolve"
    assert len(records) == 48 and {r["distance"] for r in records} == {256, 512, 1024, 1536}
    evolve_lines = {line for f in _long_files("evolve") for line in f.text.split("\n")}
    eval_only = {line for f in _long_files("eval") for line in f.text.split("\n")
                 if len(line.strip()) > 30} - evolve_lines
    assert eval_only
    for r in records:
        body = r["text"].split("\n")[:-1]  # the last line is the question
        assert not eval_only.intersection(body)
        assert sum(line in evolve_lines for line in body) >= len(body) - 1  # all but the planted definition
    # the held-out sets share no prompt with it
    held_out = {r["text"] for s in ("eval", "thirdparty") for r in load_records("retrieval", s)}
    assert not held_out.intersection(r["text"] for r in records)
    _, short = select.selection_records("select", per_distance=2)
    assert len(short) == 8


def test_search_moves_one_option_at_a_time_and_keeps_the_current_value_on_ties(select):
    start = {"representative": "max", "recent_queries": 8, "chunk_size": 64, "retrieve": 4, "retrieve_every": 8}

    def objective(c):  # best: mean, 4 queries, chunks of 32; retrieve_every does not matter
        return ((c["representative"] == "mean") * 10 + (c["recent_queries"] == 4) * 5
                + (c["chunk_size"] == 32) * 2 + (c["chunk_size"] * c["retrieve"] == 256))

    chosen, trail = select.search(objective, start, sweeps=3, log=lambda s: None)
    assert chosen == {"representative": "mean", "recent_queries": 4, "chunk_size": 32, "retrieve": 8,
                      "retrieve_every": 8}
    keys = [select.key(t["config"]) for t in trail]
    assert len(keys) == len(set(keys))  # every configuration evaluated once
    assert all(t["config"]["chunk_size"] * t["config"]["retrieve"] == 256 for t in trail)


@pytest.fixture(scope="module")
def report():
    return load_benchmark("bank")


@pytest.mark.parametrize("split", ["select", "evolve"])
def test_the_bank_report_refuses_the_splits_the_defaults_were_chosen_on(report, split):
    with pytest.raises(TokenmemError, match="held-out sets only"):
        report.main(["--splits", split])


def test_the_bank_report_runs_on_both_held_out_sets(report, tmp_path):
    import json

    out = tmp_path / "bank.json"
    assert report.main(["--per-distance", "1", "--budgets", "0.25", "--evictors", "sink", "--matched", "sink",
                        "--skip-shift", "--threads", "1", "--json", str(out), "--out", str(tmp_path / "bank.md")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["split"], r["method"], r["bank"], r.get("control")) for r in rows] == [
        (s, m, b, c) for s in ("eval", "thirdparty")
        for m, b, c in (("full", "off", None), ("sink", "off", None), ("sink", "on", None), ("sink", "off", "matched"))]
    for r in rows:
        assert r["prompts"] == 4 and "error" not in r
    for s in ("eval", "thirdparty"):
        off, on, control = [r for r in rows if r["split"] == s][1:]
        assert on["attended"] > off["attended"] + 0.2 and control["budget"] == min(1.0, round(on["attended"], 2))
    text = (tmp_path / "bank.md").read_text()
    assert "### eval split" in text and "### third-party set" in text and "chosen on the evolve files" in text


def test_merge_lets_a_later_run_replace_one_methods_rows(tmp_path):
    """benchmarks/bank.py --merge: a later file with rows of a method (bank off / on / matched control) replaces
    that method's earlier rows on that set and no others; the report names the replacement."""
    bank = load_benchmark("bank")

    def row(split, method, bank_on, budget, em, control=None):
        r = {"split": split, "method": method, "bank": bank_on, "budget": budget, "em": em}
        return dict(r, control=control) if control else r

    meta = {"date": "2026-12-01", "wall_s": 10.0, "prompts": {"eval": 4, "thirdparty": 4}}
    old = {"meta": meta, "shift": [], "rows": [
        row("eval", "full", "off", None, 80.0), row("eval", "sink", "off", 0.25, 0.0), row("eval", "namm", "off", 0.25, 10.0),
        row("eval", "namm", "on", 0.25, 70.0), row("eval", "namm", "off", 0.7, 20.0, "matched"),
        row("thirdparty", "namm", "on", 0.25, 60.0)]}
    new = {"meta": dict(meta, date="2026-12-03", wall_s=5.0), "shift": [], "rows": [
        row("eval", "namm", "off", 0.25, 77.0), row("eval", "namm", "on", 0.25, 83.0),
        row("eval", "namm", "off", 0.66, 85.0, "matched")]}
    merged_meta, rows, _ = bank.merge_parts([old, new], ["old.json", "new.json"])
    got = {(r["split"], r["method"], r["bank"], r["budget"]): r["em"] for r in rows}
    assert got == {("eval", "full", "off", None): 80.0, ("eval", "sink", "off", 0.25): 0.0,
                   ("eval", "namm", "off", 0.25): 77.0, ("eval", "namm", "on", 0.25): 83.0,
                   ("eval", "namm", "off", 0.66): 85.0,
                   ("thirdparty", "namm", "on", 0.25): 60.0}  # the other set's namm row stays
    assert merged_meta["wall_s"] == 15.0 and merged_meta["replaced"] == ["namm rows from new.json (2026-12-03)"]
    # files with different methods are joined as before, nothing replaced
    _, rows, _ = bank.merge_parts([{"meta": meta, "shift": [], "rows": old["rows"][:2]}, new], ["a", "b"])
    assert len(rows) == 5
