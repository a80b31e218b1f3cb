"""benchmarks/language.py --merge: a later file's row replaces an earlier one of the same method and budget."""

from __future__ import annotations

import json

from conftest import load_benchmark


def _row(method, budget, code):
    return {"method": method, "budget": budget, "wall_s": 1.0, "code-completion": code, "retrieval": 0.0,
            "retrieval_by_distance": {"256": 0.0}, "perplexity": 15.0, "kv_held": budget or 1, "decode_ms": 9.0}


def test_merge_replaces_rows_of_the_same_method_and_budget(tmp_path):
    bench = load_benchmark("language")
    meta = {"date": "2026-12-03", "model": "m", "quick": False, "machine": "x", "torch": "t", "transformers": "t",
            "wall_s": 10.0}
    main = {"rows": [_row("full", None, 30.0), _row("namm", 0.25, 25.1), _row("h2o", 0.25, 27.1)], "meta": meta}
    new = {"rows": [_row("namm", 0.25, 41.7), _row("namm (language-v2)", 0.25, 25.1)], "meta": dict(meta, wall_s=5.0)}
    paths = []
    for name, data in (("main", main), ("new", new)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "report.md"
    assert bench.main(["--merge", *map(str, paths), "--out", str(out)]) == 0
    lines = [line for line in out.read_text().splitlines() if line.startswith("| namm")]
    assert len(lines) == 2 and "41.7" in lines[0] and "25.1" not in lines[0]  # the v2 row of main.json is gone
    assert lines[1].startswith("| namm (language-v2) |")
    assert "total wall time 15.0 s" in out.read_text()  # the files' wall times add up
