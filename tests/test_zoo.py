"""The shipped language model, its corpus, tokenizer and tasks (issue: a real small language model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenmem.compat import cache_kwargs
from tokenmem.errors import TokenmemError
from tokenmem.zoo import SCORERS_DIR, STDLIB_LM, corpus, lm_tasks, planting


def test_corpus_is_deterministic_and_split_by_file(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "a.py").write_text("x = 1\n")
    (root / "pkg" / "b.py").write_text("def f():\n    return 2\n")
    (root / "site-packages" / "c.py").write_text("ignored = True\n")
    (root / "bad.py").write_bytes(b"\xff\xfe not utf-8")
    first, second = corpus.iter_files(root), corpus.iter_files(root)
    assert [f.path for f in first] == ["a.py", "pkg/b.py"]
    assert corpus.manifest(first) == corpus.manifest(second)
    (root / "a.py").write_text("x = 2\n")
    assert corpus.manifest(corpus.iter_files(root))["sha256"] != corpus.manifest(first)["sha256"]
    # the split depends only on the path
    assert all(f.split == corpus.split_of(f.path) for f in first)
    splits = {corpus.split_of(f"m{i}.py") for i in range(200)}
    assert splits == {"train", "heldout"}


def test_real_stdlib_split_is_stable():
    files = corpus.iter_files()
    held = [f.path for f in files if f.split == "heldout"]
    assert 0.03 < len(held) / len(files) < 0.1
    assert held == [f.path for f in corpus.iter_files(split="heldout")]


@pytest.mark.parametrize("a,b,expected", [("abc", "abc", 1.0), ("", "", 1.0), ("abc", "", 0.0),
                                          ("kitten", "sitting", 1 - 3 / 7), ("return x", "return y", 1 - 1 / 8)])
def test_edit_similarity(a, b, expected):
    assert lm_tasks.edit_similarity(a, b) == pytest.approx(expected)


def test_answer_extraction():
    assert lm_tasks.completion_line("\n        return self.x\n    def") == "return self.x"
    assert lm_tasks.completion_line("  # no newline") == ""
    assert lm_tasks.retrieved_value("48213\n") == "48213"
    assert lm_tasks.retrieved_value(" 4821x") == "4821"
    assert lm_tasks.retrieved_value("x48213") == ""


def test_planting_puts_every_query_after_its_definition():
    rng = np.random.default_rng(0)
    lines = [f"line_{i} = {i}" for i in range(50)]
    out = planting.plant_pairs(lines, rng, 5)
    assert len(out) == 60
    defs = {l.split(" = ")[0].strip(): (k, l.split(" = ")[1]) for k, l in enumerate(out) if l.strip().startswith("_")}
    queries = [(k, l) for k, l in enumerate(out) if l.strip().startswith("assert ")]
    assert len(defs) == 5 and len(queries) == 5
    for k, q in queries:
        name, value = q.strip()[len("assert "):].split(" == ")
        assert defs[name][0] < k and defs[name][1] == value
    text = planting.synthetic_recall(np.random.default_rng(1), 6, 9)
    seen = {}
    for line in text.splitlines():
        if line.startswith("assert "):
            name, value = line[len("assert "):].split(" == ")
            assert seen[name] == value
        else:
            name, value = line.split(" = ")
            seen[name] = value


def test_task_files_shipped_and_disjoint():
    for split in lm_tasks.SPLITS:
        for name in ("code-completion", "retrieval"):
            assert lm_tasks.load_records(name, split)
    files = {split: {r["file"] for r in lm_tasks.load_records("code-completion", split)} for split in lm_tasks.SPLITS}
    assert not files["evolve"] & files["eval"]
    retrieval = lm_tasks.load_records("retrieval", "eval")
    assert {r["distance"] for r in retrieval} == set(lm_tasks.DISTANCES)
    for r in retrieval:
        assert r["text"].endswith(planting.query_prefix(r["text"].rsplit("assert ", 1)[1].split(" == ")[0]))
        assert len(r["answer"]) == planting.VALUE_DIGITS
        assert abs(r["measured_distance"] - r["distance"]) < 0.15 * r["distance"]
    with pytest.raises(TokenmemError, match="no task file"):
        lm_tasks.load_records("retrieval", "nope")


def test_task_scoring_on_hand_made_outputs():
    from tokenmem.plugins.namm.tasks import TaskOutput

    task = lm_tasks.RetrievalTask(split="eval", limit=2)

    class Tok:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    task.tokenizer = Tok()
    answers = [r["answer"] for r in task.records]
    outs = [TaskOutput(index=[0], input_ids=None, generated=torch.tensor([[ord(c) for c in answers[0]]]), memory=None),
            TaskOutput(index=[1], input_ids=None, generated=torch.tensor([[ord(c) for c in "00000"]]), memory=None)]
    expected = 0.5 if answers[1] != "00000" else 1.0
    assert task.score(outs) == expected


def test_shipped_model_loads_with_plain_transformers_and_generates():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tokenmem

    model = AutoModelForCausalLM.from_pretrained(STDLIB_LM).eval()
    tok = AutoTokenizer.from_pretrained(STDLIB_LM)
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]
    ids = tok("import os\n\ndef main():\n", return_tensors="pt").input_ids
    memory = tokenmem.TokenMemory(model, "h2o", budget=64)
    out = model.generate(ids, **cache_kwargs(model, memory), max_new_tokens=256, min_new_tokens=256, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 256
    assert memory.seen == out.shape[1] - 1
    assert max(memory.stats()["held"]) <= 64 + memory.interval


def test_shipped_model_retrieves_with_full_cache():
    task = lm_tasks.RetrievalTask(split="eval", distances=(256,))
    model = task.load_model()
    from tokenmem import TokenMemory

    score = task.score(task.run(model, lambda: TokenMemory(model, "full")))
    assert score >= 0.8


def test_shipped_scorer_loads_and_runs_a_256_token_generate_on_the_shipped_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tokenmem
    from tokenmem.plugins.namm import NAMM

    namm = NAMM.pretrained("language")
    assert torch.isfinite(namm.params).all()
    assert not torch.equal(namm.params, NAMM(namm.config).params)  # evolved, not the initial keep-all scorer
    log = json.loads((SCORERS_DIR / "language" / "evolution.json").read_text())
    assert log["generations_done"] > 0 and log["final"] is not None
    assert (SCORERS_DIR / "language" / "fitness_curve.png").stat().st_size > 0
    model = AutoModelForCausalLM.from_pretrained(STDLIB_LM).eval()
    ids = AutoTokenizer.from_pretrained(STDLIB_LM)("import os\n\ndef main():\n", return_tensors="pt").input_ids
    memory = tokenmem.TokenMemory(model, namm, budget=64)
    out = model.generate(ids, **cache_kwargs(model, memory), max_new_tokens=256, min_new_tokens=256, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 256
    assert memory.seen == out.shape[1] - 1
    assert max(memory.stats()["held"]) <= 64 + memory.interval
    with pytest.raises(TokenmemError, match="no shipped NAMM scorer"):
        NAMM.pretrained("klingon")


def test_shipped_video_model_answers_held_out_clips_well_above_chance():
    """shapes-llava-video loads with plain from_pretrained and, through VideoQA with the full cache, answers held-out
    clips far above chance (25% per question; its card reports 91.3% on 300 clips)."""
    from transformers import LlavaNextVideoForConditionalGeneration

    from tokenmem.adapters.video import VideoQA
    from tokenmem.zoo import video_lm_path, video_task

    path = video_lm_path()
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == json.loads((path / "training.json").read_text())["parameters"]
    assert (path / "model.safetensors").stat().st_size < 30 * 2**20
    qa = VideoQA(path, "full", frames=24)
    clips = video_task.clips("heldout", 12)
    items = [(clip, kind) for clip in clips for kind in video_task.QUESTIONS]
    answers = qa.ask_many([c.frames for c, _ in items], [video_task.QUESTIONS[k] for _, k in items], max_new_tokens=6)
    right = [a.text.strip() == clip.answer(kind) for a, (clip, kind) in zip(answers, items)]
    assert np.mean(right) >= 0.75


def test_demo_runs_every_evictor_and_the_bank_recovers_the_value(capsys):
    """`tokenmem demo` (the README's main command) on the shipped models and scorer: language, video (LLaVA-NeXT-Video
    and Qwen2-VL), RL."""
    from transformers.utils import logging as hf_logging

    from tokenmem.zoo.demo import run

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    assert run() == 0
    captured = capsys.readouterr()
    out = captured.out
    # its own progress, one line before and after each part; transformers' loading bars hidden, then restored
    for k, part in ((1, "language"), (2, "video"), (3, "video"), (4, "RL")):
        assert f"\n[{k}/4] {part}: " in out and f"\n[{k}/4] done in " in out, out
    assert "shipped LLaVA-NeXT-Video model" in out and "shipped Qwen2-VL model" in out
    assert "Loading weights" not in captured.err and hf_logging.is_progress_bar_enabled() == bars
    assert torch.get_num_threads() == threads  # one thread while it ran, the caller's setting back
    language, rest = out.split("\nVideo QA:", 1)
    videos, hopper = rest.split("\nDecision Transformer:", 1)
    llava, qwen = videos.split("\nVideo QA:", 1)
    assert "(LLaVA-NeXT-Video architecture" in llava
    assert "(Qwen2-VL architecture, a temporal patch covers 2 frames" in qwen

    def table(text):
        return {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}

    rows = table(language)
    for label in ("full", "recent", "sink", "separator", "h2o", "namm (language scorer)", "sink + memory bank"):
        assert label in rows, out
    assert "(ok)" in rows["full"] and "(ok)" in rows["sink + memory bank"]
    assert "(wrong)" in rows["sink"]  # the value was evicted; the bank brought it back
    quarters = [float(x) for x in rows["full"].split(" | ")[6].strip(" |").replace("%", "").split("/")]
    assert quarters == [100.0] * 4  # the full cache holds every prompt token
    # the video question on a generated held-out clip, both architectures: full cache, h2o and NAMM at 25%
    for video in (llava, qwen):
        rows = table(video)
        for label in ("full", "h2o", "namm (language scorer)"):
            assert label in rows, out
        assert rows["full"].count("(ok)") >= 2  # the shipped model answers the clip (three questions)
        kv = {label: int(rows[label].split(" | ")[2].rstrip("%"))
              for label in ("full", "h2o", "namm (language scorer)")}
        assert kv["full"] == 100 and kv["h2o"] <= 30 and kv["namm (language scorer)"] <= 30  # 25% + the newest chunk
        assert "namm kept of each frame" in video
    # the Hopper episode of the shipped Decision Transformer: full history, then NAMM at 60 tokens
    rows = table(hopper)
    for label in ("full history", "namm (language scorer)"):
        assert label in rows, out
    held = [int(x) for x in rows["namm (language scorer)"].split(" | ")[5].strip(" |").split("/")]
    assert sum(held) <= 60 + 3  # the budget, plus the newest step's tokens
    full = rows["full history"].split(" | ")
    assert sum(int(x) for x in full[5].strip(" |").split("/")) == 3 * int(full[4]) - 1  # nothing evicted


def test_demo_refuses_bad_threads():
    from tokenmem.zoo.demo import run

    for bad in (0, -2, 1.5):
        with pytest.raises(TokenmemError, match="threads must be a positive int"):
            run(threads=bad)
