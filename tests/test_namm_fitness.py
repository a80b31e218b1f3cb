"""The continuous NAMM fitness (v2): teacher-forced answer likelihood and streaming perplexity under a memory.

With the full cache, the streamed values must equal a direct teacher-forced computation (one forward over
prompt + answer, no cache); batching must not change them; the fitness of a memory that keeps everything is 1;
an evolution on a likelihood task resumes to the identical result after a kill; the shipped fitness set is
equal-length, from the evolve split only, and disjoint by file from the eval split.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_model
from tokenmem import TokenMemory
from tokenmem.errors import TokenmemError
from tokenmem.plugins.namm import NAMM, NAMMConfig
from tokenmem.plugins.namm.evolve import EvolveSettings, Fitness, evolve, load_checkpoint, stalled
from tokenmem.plugins.namm.likelihood import AnswerLikelihoodTask, StreamingPerplexityTask


def _data(count=4, length=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (length,), generator=g) for _ in range(count)]
    answers = [torch.randint(3, 300, (1 + 2 * i,), generator=g) for i in range(count)]  # lengths 1, 3, 5, 7
    return prompts, answers


def _direct_answer_logp(model, prompt, answer):
    ids = torch.cat([prompt, answer])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # [L + A, V], no cache
    logp = torch.log_softmax(logits, -1)
    start = prompt.numel() - 1  # the last prompt position predicts the first answer token
    return float(logp[start : start + answer.numel()].gather(-1, answer[:, None]).mean())


def test_answer_likelihood_with_the_full_cache_equals_direct_teacher_forcing():
    model = tiny_model("llama")
    prompts, answers = _data()
    task = AnswerLikelihoodTask(name="t", prompts=prompts, answers=answers, chunk=16, batch_size=2, model=model)
    values = task.run(model, lambda: TokenMemory(model, "full"))
    direct = [_direct_answer_logp(model, p, a) for p, a in zip(prompts, answers)]
    assert max(abs(v - d) for v, d in zip(values, direct)) < 2e-5, (values, direct)
    assert task.relative_score(values, values) == 1.0
    single = AnswerLikelihoodTask(name="t", prompts=prompts, answers=answers, chunk=16, batch_size=1, model=model)
    assert max(abs(a - b) for a, b in zip(values, single.run(model, lambda: TokenMemory(model, "full")))) < 2e-5


def test_streaming_perplexity_with_the_full_cache_equals_one_forward():
    model = tiny_model("qwen2")
    prompts, _ = _data(count=3, length=50, seed=1)
    task = StreamingPerplexityTask(name="p", prompts=prompts, chunk=16, batch_size=3, model=model)
    values = task.run(model, lambda: TokenMemory(model, "full"))
    for v, p in zip(values, prompts):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=p[None]).logits[0, :-1].double(), -1)
        direct = float(logp.gather(-1, p[1:, None]).mean())
        assert abs(v - direct) < 2e-5


def test_an_evicting_memory_moves_the_fitness_and_keep_all_namm_scores_one():
    model = tiny_model("llama")
    prompts, answers = _data(length=96)
    task = AnswerLikelihoodTask(name="t", prompts=prompts, answers=answers, budget=24, chunk=16, batch_size=2,
                                model=model)
    cfg = NAMMConfig(interval=16)
    fitness = Fitness([task], cfg, models=[model])
    reference = fitness.compute_reference()["t"]
    assert reference == task.run(model, lambda: TokenMemory(model, "full"))
    recent = task.relative_score(task.run(model, lambda: TokenMemory(model, "recent", budget=24)), reference)
    assert recent > 0 and abs(recent - 1.0) > 1e-3  # eviction changes the answers' likelihood (random model:
    # either way)
    keep_all = AnswerLikelihoodTask(name="t", prompts=prompts, answers=answers, budget=None, chunk=16, batch_size=2,
                                    model=model)
    fitness = Fitness([keep_all], cfg, models=[model])
    assert fitness(NAMM(cfg).params.double().numpy()) == pytest.approx(1.0, abs=1e-6)  # scores 1: keeps all


def test_bad_tasks_are_refused():
    prompts, answers = _data()
    with pytest.raises(TokenmemError, match="different lengths"):
        AnswerLikelihoodTask(prompts=[prompts[0], prompts[1][:50]], answers=answers[:2], batch_size=2)
    with pytest.raises(TokenmemError, match="answer"):
        AnswerLikelihoodTask(prompts=prompts, answers=answers[:2])
    with pytest.raises(TokenmemError, match="no model"):
        AnswerLikelihoodTask(prompts=prompts, answers=answers).load_model()
    with pytest.raises(TokenmemError, match="patience"):
        EvolveSettings(patience=0)


def test_patience_stops_when_the_mean_stalls():
    hist = [{"mean_fitness": v} for v in (0.5, 0.6, 0.6, 0.55, 0.59)]
    assert not stalled(hist, None)
    assert not stalled(hist, 4)  # best (0.6) first reached at generation 1: 3 generations without improvement
    assert stalled(hist, 3)
    assert not stalled(hist[:2], 1)


class Killed(Exception):
    pass


def test_a_killed_likelihood_evolution_resumes_to_the_same_result(tmp_path):
    model = tiny_model("llama")
    prompts, answers = _data(length=64)
    task = AnswerLikelihoodTask(name="t", prompts=prompts, answers=answers, budget=0.25, chunk=16, batch_size=2,
                                model=model)
    small = dict(generations=3, population=4, sigma=0.5, seed=3, progress=False, config=NAMMConfig(interval=16))
    full = evolve(task, tmp_path / "full", models=[model], **small)

    def kill(record):
        if record["generation"] == 1:
            raise Killed

    with pytest.raises(Killed):
        evolve(task, tmp_path / "cut", models=[model], callback=kill, **small)
    assert load_checkpoint(tmp_path / "cut")["generation"] == 2
    resumed = evolve(task, tmp_path / "cut", models=[model], resume=True, **small)
    assert np.array_equal(resumed.mean_params, full.mean_params)
    assert resumed.history == full.history and resumed.mean_fitness == full.mean_fitness
    assert isinstance(full.reference["t"], list) and len(full.reference["t"]) == len(prompts)
    assert len({round(v, 6) for v in full.history[0]["population_fitness"]}) > 1  # candidates really differ


def test_the_shipped_fitness_set_is_equal_length_and_from_the_evolve_split_only():
    from tokenmem.zoo import namm_fitness
    from tokenmem.zoo.lm_tasks import _long_files, load_records

    evolve_files = {f.path for f in _long_files("evolve")}
    eval_files = {f.path for f in _long_files("eval")}
    assert evolve_files and not evolve_files & eval_files
    for name, length in (("code-completion", namm_fitness.CODE_TOKENS),
                         ("retrieval", namm_fitness.RETRIEVAL_TOKENS), ("perplexity", namm_fitness.WINDOW_TOKENS)):
        records = namm_fitness.load(name)
        assert len(records) >= 32, name
        assert {len(r["input_ids"]) for r in records} == {length}, name
        assert {r["file"] for r in records if "file" in r} <= evolve_files, name
    for r in namm_fitness.load("retrieval"):
        assert r["measured_distance"] < namm_fitness.RETRIEVAL_TOKENS - 16  # the definition survived the trim
    used = {r["file"] for name in ("code-completion", "perplexity") for r in load_records(name, "eval") if "file" in r}
    assert used <= eval_files
    assert math.isclose(sum(len(r["answer_ids"]) > 0 for r in namm_fitness.load("code-completion")), 32)


def test_v3_retrieval_prompts_are_laid_out_as_the_eval_split():
    """``retrieval-early``: the value near the start (as in the eval split's retrieval prompts), one length per
    distance (so batches need no padding), the definition intact and the answer the value's digits."""
    from transformers import AutoTokenizer

    from tokenmem.zoo import namm_fitness, stdlib_lm_path
    from tokenmem.zoo.lm_tasks import load_records

    tok = AutoTokenizer.from_pretrained(stdlib_lm_path())
    records = namm_fitness.load("retrieval-early")
    assert len(records) >= 32
    for d in namm_fitness.EARLY_DISTANCES:
        mine = [r for r in records if r["distance"] == d]
        assert len(mine) >= 8 and {len(r["input_ids"]) for r in mine} == {d + namm_fitness.EARLY_EXTRA}
    for r in records:
        assert namm_fitness.EARLY_LEAD <= r["definition_at"] <= 128
        head = tok.decode(r["input_ids"][: r["definition_at"] + 16])
        assert "_SECRET_" in head and f"= {r['answer']}" in head, head[-80:]
        assert tok.decode(r["input_ids"] + r["answer_ids"]).endswith("== " + r["answer"])
    eval_starts = [len(tok(r["text"][: r["text"].index("_SECRET_")], add_special_tokens=False)["input_ids"])
                   for r in load_records("retrieval", "eval")]
    early = [r["definition_at"] for r in records]
    # the same region of the prompt as the eval's values (v2's fitness put them 118-917 tokens in)
    assert min(eval_starts) - 32 <= min(early) and max(early) <= max(eval_starts) + 32
    task_names = [t.name for t in namm_fitness.tasks(model=object(), limit=4, version="v3")]
    assert task_names == ["code-completion@25", "retrieval-early@25", "perplexity@25",
                          "code-completion@50", "retrieval-early@50", "perplexity@50"]
    with pytest.raises(TokenmemError, match=r"batch_size=3 would mix lengths in a batch: use one of \[1, 2, 4, 8\]"):
        namm_fitness.tasks(model=object(), version="v3", batch_size=3)
    with pytest.raises(TokenmemError, match="unknown NAMM fitness version"):
        namm_fitness.tasks(model=object(), version="v9")
    from tokenmem.plugins.namm.likelihood import _batches

    prompts = [torch.zeros(n) for n in [10] * 8 + [12] * 8 + [14] * 3]  # runs of 8, 8 and a last run of 3
    assert _batches("t", prompts, 4)[-1] == [16, 17, 18]  # the last run may end in a short batch
    fits = r"batch_size=3 would mix .*use one of \[1, 2, 4, 8\] \(runs of \[8, 8, 3\]"
    with pytest.raises(TokenmemError, match=fits):
        _batches("t", prompts, 3)


def test_shipping_keeps_the_previous_scorer_loadable_under_its_version(tmp_path, monkeypatch):
    import shutil

    import tokenmem.zoo as zoo
    from tokenmem.plugins.namm import NAMM, NAMMConfig
    from tokenmem.plugins.namm.scorer import initial_params
    from tokenmem.zoo import evolve_language

    shipped = {name: evolve_language.shipped_version(zoo.SCORERS_DIR / name)
               for name in ("language", "language-v2", "language-v1")}
    assert shipped == {"language": "v3", "language-v2": "v2", "language-v1": "v1"}  # what the package ships
    scorers = tmp_path / "scorers"  # as it was before v3 shipped
    for name, source in (("language", "language-v2"), ("language-v1", "language-v1")):
        shutil.copytree(zoo.SCORERS_DIR / source, scorers / name)
    monkeypatch.setattr(zoo, "SCORERS_DIR", scorers)
    run = tmp_path / "run"
    cfg = NAMMConfig(interval=128, key_diff=True)
    NAMM(cfg, initial_params(cfg)).save(run)
    assert evolve_language.shipped_version(scorers / "language") == "v2"  # read from the logs' tasks
    assert evolve_language.shipped_version(scorers / "language-v1") == "v1"
    log = json.loads((scorers / "language" / "evolution.json").read_text())  # the v2 run's log
    (run / "evolution.json").write_text(json.dumps(log))
    with pytest.raises(SystemExit, match="holds a v2 evolution, not v3"):
        evolve_language.ship(run, "v3")  # a v2 run is never shipped as v3
    for task in log["tasks"]:
        task["name"] = task["name"].replace("retrieval@", "retrieval-early@")
    (run / "evolution.json").write_text(json.dumps(log))
    evolve_language.ship(run, "v3")
    assert NAMM.from_file(scorers / "language").config.key_diff
    assert not NAMM.from_file(scorers / "language-v2").config.key_diff  # the v2 scorer moved, unchanged
    assert json.loads((scorers / "language" / "evolution.json").read_text())["scorer_version"] == "v3"
    assert evolve_language.shipped_version(scorers / "language-v2") == "v2"
    assert (scorers / "language" / "fitness_curve.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="already holds a v3 scorer"):
        evolve_language.ship(run, "v3")
