"""The zero-shot transfer benchmark (tokenmem bench): the claims it states are the rows' numbers, the README section
it rewrites, bad options, and a smoke run of every modality on the shipped models (the CI's reduced set)."""

import json

import pytest

from tokenmem.errors import TokenmemError
from tokenmem.zoo import transfer, transfer_report


def row(modality, evictor, budget, score, kv, **details):
    return {"modality": modality, "evictor": evictor, "budget": budget, "score": score, "score_std": 1.0,
            "kv_fraction": kv, "throughput": 10.0, "throughput_unit": "x/s", "seconds": 1.0, "items": 3,
            "metrics": {}, "details": details}


def synthetic_report():
    video = dict(event_token_share=0.4, event_frame_share=0.25)
    rows = [row("video", "full", None, 80.0, 1.0, **video), row("video", "recent", 0.25, 50.0, 0.25, **video),
            row("video", "sink", 0.25, 60.0, 0.25, **video), row("video", "h2o", 0.25, 79.0, 0.25, **video),
            row("video", "namm", 0.25, 79.0, 0.26, event_token_share=0.2, event_frame_share=0.25)]
    return {"rows": rows, "modalities": ["video"], "budgets": [0.25]}


def test_claims_state_what_the_rows_say():
    lines = transfer_report.claims(synthetic_report())
    namm = next(line for line in lines if line.startswith("- **video, 25%**"))
    assert "beats recent (79.0 vs 50.0" in namm and "beats sink" in namm and "ties h2o" in namm
    assert "within 2% of full" in namm and "1.2% below" in namm
    assert any("namm at 25%: 20%" in line and "does not favour event frames" in line for line in lines)
    assert any("h2o at 25%: 40%" in line and "keeps event frames first" in line for line in lines)
    report = synthetic_report()
    report["rows"][-1]["score"] = 70.0
    assert "not within 2% of full" in "\n".join(transfer_report.claims(report))
    report["rows"][1]["score"] = 69.5  # recent: 0.5 below with a spread of 1.0 over 3 items: noise
    assert "beats recent (within noise)" in "\n".join(transfer_report.claims(report))


def test_readme_section_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- transfer:begin -->\nold\n<!-- transfer:end -->\n\ntail\n")
    transfer_report.update_readme(readme, "new table\n")
    assert readme.read_text() == "# x\n\n<!-- transfer:begin -->\nnew table\n<!-- transfer:end -->\n\ntail\n"
    (tmp_path / "other.md").write_text("no markers\n")
    with pytest.raises(TokenmemError, match="markers"):
        transfer_report.update_readme(tmp_path / "other.md", "x")


def test_bad_options_fail_before_any_work():
    with pytest.raises(TokenmemError, match="unknown modality 'audio'"):
        transfer.run(modalities=["audio"])
    with pytest.raises(TokenmemError, match="unknown evictor 'lru'"):
        transfer.run(evictors=["lru"])
    with pytest.raises(TokenmemError, match="budgets are fractions"):
        transfer.run(budgets=[0.25, 64])


def test_a_missing_or_unmarked_readme_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    with pytest.raises(TokenmemError, match="no such file"):
        transfer.main(["--smoke", "--out", str(tmp_path / "out"), "--readme", str(tmp_path / "missing.md")])
    for name, text in (("plain.md", "no markers\n"),
                       ("reversed.md", "<!-- transfer:end -->\nold\n<!-- transfer:begin -->\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(TokenmemError, match="markers"):
            transfer.main(["--smoke", "--out", str(tmp_path / "out"), "--readme", str(tmp_path / name)])
    (tmp_path / "latin1.md").write_bytes("caf\xe9 <!-- transfer:begin --><!-- transfer:end -->".encode("latin-1"))
    with pytest.raises(TokenmemError, match="not UTF-8"):
        transfer.main(["--smoke", "--out", str(tmp_path / "out"), "--readme", str(tmp_path / "latin1.md")])
    assert not (tmp_path / "out").exists()


def test_missing_rl_packages_fail_before_any_modality_runs(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_imageio(name, *a):
        if name.startswith("gymnasium"):  # gymnasium installed without its mujoco extra's imageio
            raise ModuleNotFoundError("No module named 'imageio'", name="imageio")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", without_imageio)
    ran = []
    monkeypatch.setitem(transfer.RUNNERS, "language", lambda *a, **k: ran.append("language") or [])
    with pytest.raises(TokenmemError, match=r"rl modality needs gymnasium.*imageio.*tokenmem\[rl\]"):
        transfer.run(modalities=["language", "rl"], evictors=["full"])
    assert ran == []  # language (first) never started


def test_reports_of_separate_modality_runs_merge(tmp_path):
    from pathlib import Path

    shipped = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "transfer" /
                          "transfer.json").read_text())
    parts = []
    for modality in shipped["modalities"]:
        part = dict(shipped, rows=[r for r in shipped["rows"] if r["modality"] == modality], modalities=[modality],
                    seconds={modality: shipped["seconds"][modality]})
        path = tmp_path / f"{modality}.json"
        path.write_text(json.dumps(part))
        parts.append(str(path))
    assert transfer.main(["--from-json", *parts, "--out", str(tmp_path / "merged"), "--no-plots"]) == 0
    merged = json.loads((tmp_path / "merged" / "transfer.json").read_text())
    assert merged["rows"] == shipped["rows"] and merged["modalities"] == shipped["modalities"]
    assert merged["seconds"] == shipped["seconds"]
    with pytest.raises(TokenmemError, match="repeat a modality"):
        transfer.merge_reports([json.loads(Path(parts[0]).read_text())] * 2)
    other = dict(json.loads(Path(parts[1]).read_text()), scorer="initial")
    with pytest.raises(TokenmemError, match="different scorer"):
        transfer.merge_reports([json.loads(Path(parts[0]).read_text()), other])
    other = dict(json.loads(Path(parts[1]).read_text()), scorer_digest="0123456789ab")  # same name, other contents
    with pytest.raises(TokenmemError, match="different scorer_digest"):
        transfer.merge_reports([json.loads(Path(parts[0]).read_text()), other])


def test_rows_of_a_later_run_replace_the_same_rows(tmp_path):
    """--update-from: a re-run of one evictor replaces exactly its rows; a new NAMM scorer must replace them all."""
    from pathlib import Path

    from tokenmem.plugins.namm import NAMM

    shipped = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "transfer" /
                          "transfer.json").read_text())
    digest = transfer.scorer_digest(NAMM.load("initial"))
    assert digest == transfer.scorer_digest(NAMM.load("initial")) and len(digest) == 12
    assert digest != transfer.scorer_digest(NAMM.load("language-v1"))
    namm = [dict(r, score=r["score"] + 1.0) for r in shipped["rows"] if r["evictor"] == "namm"]
    update = dict(shipped, rows=namm, evictors=["namm"], scorer="initial", scorer_digest=digest, date="2099-01-01",
                  seconds={m: 60.0 for m in shipped["modalities"]}, command="tokenmem bench --evictors namm", updates=[])
    base_path, update_path = tmp_path / "base.json", tmp_path / "update.json"
    base_path.write_text(json.dumps(shipped))
    update_path.write_text(json.dumps(update))
    out = tmp_path / "updated"
    assert transfer.main(["--from-json", str(base_path), "--update-from", str(update_path), "--out", str(out),
                          "--no-plots"]) == 0
    merged = json.loads((out / "transfer.json").read_text())
    assert len(merged["rows"]) == len(shipped["rows"])
    for old, got in zip(shipped["rows"], merged["rows"]):  # same order; only NAMM's rows changed
        assert got == (dict(old, score=old["score"] + 1.0) if old["evictor"] == "namm" else old)
    assert (merged["scorer"], merged["scorer_digest"], merged["date"]) == ("initial", digest, shipped["date"])
    assert merged["updates"][-1]["command"] == "tokenmem bench --evictors namm"
    assert merged["updates"][:-1] == shipped.get("updates", [])  # earlier updates of the base are kept
    text = (out / "transfer.md").read_text()
    assert "re-run on 2099-01-01" in text and "`tokenmem bench --evictors namm`" in text and digest in text
    language_only = dict(update, rows=[r for r in namm if r["modality"] == "language"], modalities=["language"])
    with pytest.raises(TokenmemError, match="leaves 6 NAMM rows of the old scorer"):
        transfer.update_report(shipped, language_only)  # video, video-qwen2vl and rl would keep the old scorer
    same = dict(shipped, scorer_digest=digest, scorer="initial")
    assert transfer.update_report(same, language_only)["rows"] != same["rows"]  # same scorer: a partial re-run is fine
    h2o = [dict(r, score=0.0) for r in shipped["rows"] if r["evictor"] == "h2o" and r["modality"] == "rl"]
    h2o_only = dict(update, rows=h2o, evictors=["h2o"], modalities=["rl"], scorer="language", scorer_digest=None)
    got = transfer.update_report(shipped, h2o_only)  # no NAMM rows: the scorer does not matter
    for old, new in zip(shipped["rows"], got["rows"]):
        assert new == (dict(old, score=0.0) if (old["modality"], old["evictor"]) == ("rl", "h2o") else old)
    assert got["scorer"] == shipped["scorer"] and got.get("scorer_digest") == shipped.get("scorer_digest")
    with pytest.raises(TokenmemError, match="different size"):
        transfer.update_report(shipped, dict(update, size="smoke"))
    with pytest.raises(TokenmemError, match="modalities the base report lacks"):
        transfer.update_report(dict(shipped, modalities=["language"]), update)
    with pytest.raises(TokenmemError, match="needs --from-json"):
        transfer.main(["--update-from", str(update_path), "--out", str(out)])


def test_separator_runs_only_where_separators_exist():
    assert ("separator", 0.25) in transfer.configs("language", transfer.EVICTORS, (0.25,))
    assert all(name != "separator" for name, _ in transfer.configs("video", transfer.EVICTORS, (0.25,)))
    assert transfer.configs("rl", ("full", "h2o"), (0.25, 0.5)) == [("full", None), ("h2o", 0.25), ("h2o", 0.5)]


def test_shipped_report_is_regenerated_from_its_json(tmp_path):
    """benchmarks/results/transfer: the markdown (and README section) come from the JSON alone."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "transfer"
    assert transfer.main(["--from-json", str(shipped / "transfer.json"), "--out", str(tmp_path), "--no-plots"]) == 0
    assert (tmp_path / "transfer.md").read_text() == (shipped / "transfer.md").read_text()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(transfer_report.README_BEGIN)[1].split(transfer_report.README_END)[0]
    assert (shipped / "transfer.md").read_text() in section
    with pytest.raises(TokenmemError, match="no such file"):
        transfer.main(["--from-json", str(tmp_path / "missing.json"), "--out", str(tmp_path)])


@pytest.mark.slow
def test_bench_smoke_runs_every_modality_on_the_shipped_models(tmp_path, capsys):
    """The CI's reduced set: full and the language-trained NAMM at 25% on language, video (both shipped video
    models: LLaVA-NeXT-Video and Qwen2-VL) and RL."""
    readme = tmp_path / "README.md"
    readme.write_text("<!-- transfer:begin -->\n<!-- transfer:end -->\n")
    out = tmp_path / "bench"
    assert transfer.main(["--smoke", "--evictors", "full", "namm", "--budgets", "0.25", "--out", str(out),
                          "--readme", str(readme), "--threads", "2"]) == 0
    report = json.loads((out / "transfer.json").read_text())
    from tokenmem.plugins.namm import NAMM

    assert report["scorer_digest"] == transfer.scorer_digest(NAMM.load("language"))
    got = {(r["modality"], r["evictor"], r["budget"]) for r in report["rows"]}
    assert got == {(m, e, b) for m in transfer.MODALITIES for e, b in (("full", None), ("namm", 0.25))}
    for r in report["rows"]:
        if r["evictor"] == "full":
            assert r["kv_fraction"] == 1.0
        else:
            assert r["kv_fraction"] <= 0.25 + 0.05  # the budget (the newest chunk or step may sit on top)
        assert r["throughput"] > 0 and r["items"] > 0
    for modality in ("video", "video-qwen2vl"):  # per video frame for both (a Qwen2-VL temporal patch covers two)
        video = next(r for r in report["rows"] if r["modality"] == modality and r["evictor"] == "namm")
        assert 0 <= video["details"]["event_token_share"] <= 1
        assert len(video["details"]["example_clip"]["frame_kept"]) == 24
    rl = next(r for r in report["rows"] if r["modality"] == "rl" and r["evictor"] == "namm")
    assert abs(sum(rl["details"]["kept_types"].values()) - 1) < 1e-3
    for name in ("transfer.md", "transfer_score_vs_kv.png", "transfer_video_frames.png",
                 "transfer_video_qwen2vl_frames.png", "transfer_rl_kept.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "transfer_score_vs_kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "**video**" in text and "**video-qwen2vl**" in text and "Claims checked on these rows" in text
    assert "transfer_rl_kept.png" in text and "transfer_video_qwen2vl_frames.png" in text
    assert "tokenmem bench --smoke" in capsys.readouterr().out
