"""Faults: trainers killed with SIGKILL mid-run resume to the result of an uninterrupted run; damaged files
(checkpoints, NAMM scorers, model weights, videos, logs) are refused with a tokenmem error naming the file,
before anything already written is changed.

The kills are real: the trainer runs in a forked child (no interpreter start-up to pay), the parent sends
SIGKILL as soon as a checkpoint past a given step is on disk, at whatever point the child has reached (often
in the middle of writing the next checkpoint). ``benchmarks/faults.py`` runs these tests (and the older fault
tests elsewhere) and writes ``benchmarks/results/faults.md``; with ``TOKENMEM_FAULTS_REPORT=<file>`` set, each
test here appends what it observed to that file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokenmem.errors import CorruptFileError, TokenmemError
from tokenmem.files import load_pickle, load_torch, save_pickle, save_torch, trim_jsonl
from video_support import tiny_llava_dir  # noqa: F401  (fixture)


# -- helpers ----------------------------------------------------------------------------------------------
def observe(fault: str, injected: str, outcome: str, tmp_path: Path | None = None) -> None:
    """Record one row of the faults table (only when benchmarks/faults.py asks for it); the test's temporary
    directory is shown as ``<tmp>``."""
    report = os.environ.get("TOKENMEM_FAULTS_REPORT")
    if report:
        if tmp_path is not None:
            outcome = outcome.replace(str(tmp_path), "<tmp>")
        with open(report, "a") as f:
            f.write(json.dumps({"fault": fault, "injected": injected, "outcome": outcome,
                                "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}) + "\n")


def _child(target, args):
    torch.set_num_threads(1)
    target(*args)


def kill_when(target, args, ready, timeout: float = 300.0) -> int:
    """Run ``target(*args)`` in a forked child and SIGKILL it once ``ready()`` is true; returns the child's exit
    code (``-SIGKILL`` when the kill landed before the child finished)."""
    child = multiprocessing.get_context("fork").Process(target=_child, args=(target, args))
    child.start()
    deadline = time.time() + timeout
    try:
        while child.is_alive() and time.time() < deadline:
            if ready():
                child.kill()
                break
            time.sleep(0.005)
    finally:
        child.join(timeout)
    return child.exitcode


def checkpoint_step(path: Path, key: str = "step") -> int:
    """The step of a checkpoint on disk, -1 when there is none yet (written atomically: never half a file)."""
    return load_torch(path)[key] if path.exists() else -1


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bit-flipped":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


def mid_write(folder: Path) -> str:
    """Whether the kill landed while a checkpoint was being written (its temporary file is left behind, unread)."""
    left = sorted(p.name for p in folder.glob(".*.tmp*"))
    return f" (the kill landed mid-write: {', '.join(left)} left beside it, never read)" if left else ""


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the language-model trainer (tokenmem.zoo.train_lm), at a tiny size ---------------------------------------
_CORPUS: dict = {}


def tiny_lm(monkeypatch):
    """train_lm with a one-layer model, two short phases and small evaluations (its loop, checkpoints, log and
    resume logic unchanged)."""
    from transformers import AutoTokenizer, LlamaConfig

    from tokenmem.zoo import lm_eval, stdlib_lm_path
    from tokenmem.zoo import train_lm as t

    if not _CORPUS:  # the standard library's files and lines, read once (seconds per run otherwise)
        _CORPUS[None] = t.iter_files()
        for split in ("train", "heldout"):
            _CORPUS[split] = [f for f in _CORPUS[None] if f.split == split]
    monkeypatch.setattr(t, "iter_files", lambda split=None: _CORPUS[split])
    if "lines" not in _CORPUS:
        _CORPUS["lines"] = {split: t.CodeLines(split) for split in ("train", "heldout")}
    monkeypatch.setattr(t, "CodeLines", lambda split: _CORPUS["lines"][split])
    monkeypatch.setattr(t, "PHASES", (t.Phase(4, 32, 2, 0.85, 0.6, (1, 2), gated=True),
                                      t.Phase(3, 64, 2, 0.5, 0.4, (1, 2))))
    monkeypatch.setattr(t, "PROBE_EVERY", 2)
    monkeypatch.setattr(t, "model_config", lambda vocab: LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=0))
    monkeypatch.setattr(t, "heldout_loss", lambda model, tok, lines, n, count, seed: lm_eval.heldout_loss(
        model, tok, lines, 64, 2, seed))
    monkeypatch.setattr(t, "repeat_accuracy", lambda model, tok, words, seed: lm_eval.repeat_accuracy(
        model, tok, words, seed, count=2))
    monkeypatch.setattr(t, "synthetic_digit_accuracy", lambda model, tok, seed: lm_eval.synthetic_digit_accuracy(
        model, tok, seed, count=2))
    tokenizer = AutoTokenizer.from_pretrained(stdlib_lm_path())  # the shipped one (training one takes minutes)

    def work_dir(path: Path) -> list[str]:
        tokenizer.save_pretrained(path / "tokenizer")
        return ["--work", str(path), "--threads", "1", "--eval-every", "1000", "--eval-prompts", "1",
                "--save-minutes", "0"]  # evaluations at the last step; probes at steps 2 and 4 (the gate)

    return t, work_dir


def _lm_log(work: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r.get("heldout_loss"))
            for r in map(json.loads, (work / "log.jsonl").read_text().splitlines())]


def test_lm_trainer_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    t, work_dir = tiny_lm(monkeypatch)
    full, cut = tmp_path / "full", tmp_path / "cut"
    t.main(work_dir(full))
    steps = sum(ph.steps for ph in t.PHASES)
    assert _lm_log(full)[-1][0] == steps and (full / "final" / "model.safetensors").exists()

    code = kill_when(t.main, (work_dir(cut),), lambda: checkpoint_step(cut / "checkpoint.pt") >= 2)
    assert code == -signal.SIGKILL
    killed_at, during = checkpoint_step(cut / "checkpoint.pt"), mid_write(cut)
    assert 2 <= killed_at < steps and not (cut / "final").exists()
    t.main(work_dir(cut))  # the same command resumes from the checkpoint
    assert _lm_log(cut) == _lm_log(full)  # every step once, the same losses and evaluations
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    observe("LM trainer (tokenmem.zoo.train_lm) SIGKILLed mid-run", f"SIGKILL after the checkpoint of step "
            f"{killed_at} of {steps} was on disk{during}; the same command run again",
            "resumes at the checkpoint; log (losses, evaluations) and final weights bit-identical to an uninterrupted run")


def test_lm_trainer_refuses_a_damaged_checkpoint(tmp_path, monkeypatch):
    t, work_dir = tiny_lm(monkeypatch)
    work = tmp_path / "run"
    monkeypatch.setattr(t, "PHASES", t.PHASES[:1])
    t.main(work_dir(work))
    ckpt = work / "checkpoint.pt"
    good = ckpt.read_bytes()
    for how in ("truncated", "bit-flipped"):
        ckpt.write_bytes(good)
        damage(ckpt, how)
        before = files_of(work)
        with pytest.raises(CorruptFileError, match=f"{ckpt}.*(truncated or corrupt|checksum)") as info:
            t.main(work_dir(work))
        assert info.value.path == str(ckpt)
        assert files_of(work) == before  # the log and the damaged checkpoint itself are left as they were
        observe("LM training checkpoint damaged", f"checkpoint.pt {how}, then the run resumed",
                f"CorruptFileError before any change: {info.value}", tmp_path)


# -- the video trainer (tokenmem.zoo.train_video --tiny) -----------------------------------------------------
VIDEO = ["--tiny", "--batch", "2", "--threads", "1", "--warmup", "1", "--lr", "1e-2", "--lr-lm", "1e-2",
         "--eval-clips", "2", "--final-clips", "2", "--quiet", "--eval-minutes", "1000"]


def test_video_trainer_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    from tokenmem.zoo.train_video import main

    full, cut = tmp_path / "full", tmp_path / "cut"
    main(["--out", str(full), "--max-steps", "6", "--save-minutes", "1000", *VIDEO])
    args = ["--out", str(cut), "--max-steps", "6", "--save-minutes", "0", *VIDEO]
    code = kill_when(main, (args,), lambda: checkpoint_step(cut / "checkpoint.pt") >= 2)
    assert code == -signal.SIGKILL
    killed_at, during = checkpoint_step(cut / "checkpoint.pt"), mid_write(cut)
    assert 2 <= killed_at < 6 and not (cut / "final").exists()
    main([*args, "--resume"])
    a, b = load_torch(full / "checkpoint.pt"), load_torch(cut / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    losses = [[r["loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines())] for d in (full, cut)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    observe("video trainer (tokenmem.zoo.train_video) SIGKILLed mid-run",
            f"SIGKILL after the checkpoint of step {killed_at} of 6{during}; the command again with --resume",
            "resumes at the checkpoint; losses and final weights bit-identical to an uninterrupted run")

    # a damaged checkpoint: refused by name, nothing touched
    ckpt = cut / "checkpoint.pt"
    damage(ckpt, "bit-flipped")
    before = files_of(cut)
    with pytest.raises(CorruptFileError, match="checksum") as info:
        main([*args, "--max-steps", "8", "--resume"])
    assert info.value.path == str(ckpt) and files_of(cut) == before
    observe("video training checkpoint damaged", "checkpoint.pt bit-flipped, then --resume",
            f"CorruptFileError before any change: {info.value}", tmp_path)


# -- the Decision Transformer trainer (tokenmem.envs.train_dt) ------------------------------------------------
@pytest.fixture(scope="module")
def dt_dataset(tmp_path_factory):
    pytest.importorskip("gymnasium")
    from decision_support import random_episodes

    from tokenmem.envs.datasets import write_dataset

    root = tmp_path_factory.mktemp("datasets")
    write_dataset("tokenmem/hopper/tiny-v0", random_episodes("Hopper-v5", 5, seed=0, max_len=40), "Hopper-v5",
                  root=root, algorithm="random", description="t")
    return root


def dt_args(root, out, steps, every=1):
    return ["--dataset", "tokenmem/hopper/tiny-v0", "--root", str(root), "--env", "Hopper-v5", "--embed", "16",
            "--layers", "1", "--batch-size", "8", "--warmup", "2", "--checkpoint-every", str(every), "--log-every",
            "10", "--threads", "1", "--no-progress", "--seed", "4", "--out", str(out), "--steps", str(steps)]


def test_dt_trainer_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path, dt_dataset):
    from tokenmem.envs import train_dt

    steps = 100
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_dt.main(dt_args(dt_dataset, full, steps, every=10_000)) == 0  # checkpoints do not change training
    code = kill_when(train_dt.main, (dt_args(dt_dataset, cut, steps, every=2),),
                     lambda: checkpoint_step(cut / "checkpoint.pt") >= 10)
    assert code == -signal.SIGKILL
    killed_at, during = checkpoint_step(cut / "checkpoint.pt"), mid_write(cut)
    assert 10 <= killed_at < steps and not (cut / "model").exists()
    assert train_dt.main([*dt_args(dt_dataset, cut, steps, every=2), "--resume"]) == 0
    a, b = load_file(full / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[(r["step"], r["loss"], r["lr"]) for r in load_torch(d / "checkpoint.pt")["log"]] for d in (full, cut)]
    assert logs[0] == logs[1] and logs[0][-1][0] == steps
    observe("DT trainer (tokenmem.envs.train_dt) SIGKILLed mid-run",
            f"SIGKILL after the checkpoint of step {killed_at} of {steps}{during}; the command again with --resume",
            "resumes at the checkpoint; losses and final weights bit-identical to an uninterrupted run")


def _train_dt_dying_after_checkpoint(args, at_step):
    """``train_dt.main`` in a child that dies (as from SIGKILL) right after writing the checkpoint of ``at_step``."""
    from tokenmem.envs import train_dt

    save = train_dt._save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        if state["step"] == at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    train_dt._save_checkpoint = save_then_die
    train_dt.main(args)


def test_dt_trainer_killed_between_log_lines_keeps_their_losses(tmp_path, dt_dataset):
    """A kill after the checkpoint of step 14, between the log lines of steps 10 and 20: the resumed run's line at
    step 20 still averages steps 11-20 (the losses of 11-14 travel in the checkpoint), as the uninterrupted run's."""
    from tokenmem.envs import train_dt

    steps = 30
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_dt.main(dt_args(dt_dataset, full, steps, every=10_000)) == 0
    assert kill_when(_train_dt_dying_after_checkpoint, (dt_args(dt_dataset, cut, steps, every=2), 14),
                     lambda: False) == -signal.SIGKILL
    assert checkpoint_step(cut / "checkpoint.pt") == 14
    assert train_dt.main([*dt_args(dt_dataset, cut, steps, every=2), "--resume"]) == 0
    logs = [[(r["step"], r["loss"]) for r in load_torch(d / "checkpoint.pt")["log"]] for d in (full, cut)]
    assert [s for s, _ in logs[0]] == [10, 20, 30] and logs[0] == logs[1]
    observe("DT trainer SIGKILLed between two log lines",
            f"SIGKILL right after the checkpoint of step 14 of {steps} (log lines every 10 steps); the command again "
            "with --resume", "the resumed run's log line at step 20 averages steps 11-20, as the uninterrupted run's "
            "(the losses since the last line travel in the checkpoint); logs identical")


def test_dt_trainer_refuses_a_damaged_checkpoint(tmp_path, dt_dataset, capsys):
    from tokenmem.envs import train_dt

    out = tmp_path / "run"
    assert train_dt.main(dt_args(dt_dataset, out, 3)) == 0
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    for how in ("truncated", "bit-flipped", "garbage", "empty"):
        ckpt.write_bytes(good)
        damage(ckpt, how)
        before = files_of(out)
        assert train_dt.main([*dt_args(dt_dataset, out, 6), "--resume"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenmem: error:")]
        assert len(err) == 1 and str(ckpt) in err[0] and ("truncated or corrupt" in err[0] or "checksum" in err[0])
        assert files_of(out) == before
        observe("DT training checkpoint damaged", f"checkpoint.pt {how}, then --resume",
                f"exit code 2 before any change: {err[0]}", tmp_path)


# -- the NAMM evolution's checkpoint (plugins/namm/evolve.py) ------------------------------------------------------
def test_namm_evolution_refuses_a_damaged_checkpoint(tmp_path):
    pytest.importorskip("cma")
    from tokenmem.plugins.namm.evolve import SyntheticTask, evolve, load_checkpoint

    out = tmp_path / "evo"
    task = SyntheticTask()
    model = task.load_model()
    evolve(task, out, models=[model], generations=1, population=4, seed=0, progress=False)
    ckpt = out / "checkpoint.pkl"
    state = load_checkpoint(out)
    good = ckpt.read_bytes()
    # a checkpoint written before checkpoints carried a checksum loads as it is
    ckpt.write_bytes(__import__("pickle").dumps(state))
    assert load_checkpoint(out)["generation"] == 1
    for how in ("truncated", "bit-flipped", "garbage"):
        ckpt.write_bytes(good)
        damage(ckpt, how)
        before = files_of(out)
        with pytest.raises(CorruptFileError, match="NAMM evolution checkpoint|checksum") as info:
            evolve(task, out, models=[model], generations=2, population=4, seed=0, progress=False, resume=True)
        assert info.value.path == str(ckpt) and files_of(out) == before
        observe("NAMM evolution checkpoint damaged", f"checkpoint.pkl {how}, then resume=True",
                f"CorruptFileError before any change: {info.value}", tmp_path)


# -- NAMM scorer files ----------------------------------------------------------------------------------------
def test_damaged_scorer_files_are_refused_by_name(tmp_path):
    from tokenmem.plugins.namm import NAMM

    NAMM.load("initial").save(tmp_path / "s")
    weights, meta = tmp_path / "s" / "scorer.safetensors", tmp_path / "s" / "scorer.json"
    good_w, good_m = weights.read_bytes(), meta.read_text()
    cases = [("scorer.safetensors", "bit-flipped", weights, "does not match the SHA-256"),
             ("scorer.safetensors", "truncated", weights, "cannot read"),
             ("scorer.json", "truncated", meta, "not valid JSON"),
             ("scorer.json", "garbage", meta, "not valid JSON")]
    for name, how, path, message in cases:
        weights.write_bytes(good_w)
        meta.write_text(good_m)
        damage(path, how)
        with pytest.raises(CorruptFileError, match=message) as info:
            NAMM.from_file(tmp_path / "s")
        assert info.value.path == str(path)
        observe(f"NAMM scorer {name} damaged", f"{name} {how}, then NAMM.from_file / evictor='namm'",
                f"CorruptFileError: {info.value}", tmp_path)
    # a scorer saved before scorer.json carried the checksum still loads
    weights.write_bytes(good_w)
    old = json.loads(good_m)
    del old["sha256"]
    meta.write_text(json.dumps(old))
    assert torch.equal(NAMM.from_file(tmp_path / "s").params, NAMM.load("initial").params)


# -- model weights ------------------------------------------------------------------------------------------------
def test_truncated_model_weights_are_refused_by_name(tmp_path, tiny_llama_dir):
    from tokenmem.adapters import TextAdapter

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    weights = model_dir / "model.safetensors"
    good = weights.read_bytes()
    for how in ("truncated", "empty"):
        weights.write_bytes(good)
        damage(weights, how)
        with pytest.raises(CorruptFileError, match="not a complete safetensors file") as info:
            TextAdapter.from_pretrained(str(model_dir))
        assert info.value.path == str(weights)
        observe("model weights (model.safetensors) damaged", f"{how}, then TextAdapter.from_pretrained",
                f"CorruptFileError: {info.value}", tmp_path)
    weights.write_bytes(good)
    (model_dir / "config.json").write_text("{")
    with pytest.raises(CorruptFileError, match="config.json") as info:
        TextAdapter.from_pretrained(str(model_dir))
    observe("model config.json damaged", "config.json truncated, then TextAdapter.from_pretrained",
            f"CorruptFileError: {info.value}", tmp_path)


def test_truncated_weights_of_the_decision_and_video_models(tmp_path, tiny_llava_dir):  # noqa: F811
    from tokenmem.adapters import VideoQA
    from tokenmem.adapters.decision import DecisionAdapter
    from tokenmem.envs import shipped_dt_path

    for name, source, load in [("DecisionAdapter", shipped_dt_path(), DecisionAdapter.from_pretrained),
                               ("VideoQA", tiny_llava_dir, VideoQA)]:
        model_dir = tmp_path / name
        shutil.copytree(source, model_dir)
        damage(model_dir / "model.safetensors", "truncated")
        with pytest.raises(CorruptFileError, match="not a complete safetensors file") as info:
            load(str(model_dir))
        assert info.value.path == str(model_dir / "model.safetensors")
        observe("model weights (model.safetensors) damaged", f"truncated, then {name}(directory)",
                f"CorruptFileError: {info.value}", tmp_path)


# -- videos -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_damaged_video_is_refused_by_name(tmp_path, how):
    from tokenmem.adapters import VideoError, read_video
    from tokenmem.adapters.video_io import write_video
    from video_fixtures import moving_shapes

    path = Path(write_video(tmp_path / "clip.mp4", moving_shapes(8, 16, 16)))
    damage(path, how)
    with pytest.raises(VideoError, match=f"could not decode '{path}'.*re-encode it") as info:
        read_video(path, 4)
    observe("video file damaged", f"mp4 {how}, then read_video / VideoQA.ask", f"VideoError: {info.value}", tmp_path)


# -- training logs --------------------------------------------------------------------------------------------
def test_log_cut_short_by_a_kill_is_trimmed_and_a_damaged_one_refused(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    log.write_text("\n".join(rows) + "\n" + rows[0][:7])  # the record being written when the process died
    assert [r["step"] for r in trim_jsonl(log, 3)] == [1, 2, 3]
    assert log.read_text() == "\n".join(rows[:3]) + "\n"  # the kept lines byte for byte
    log.write_text(rows[0] + "\n{\"ste\n" + rows[1] + "\n")
    before = log.read_bytes()
    with pytest.raises(CorruptFileError, match="corrupt at line 2"):
        trim_jsonl(log, 3)
    assert log.read_bytes() == before
    observe("training log cut short / damaged", "log.jsonl with a half-written last line; with a broken middle line",
            "the half line is dropped on resume; a broken middle line: CorruptFileError naming the file and line")


def test_sealed_files_load_with_plain_torch_and_pickle(tmp_path):
    """The checksum trailer does not get in the way of the standard loaders."""
    import pickle

    save_torch({"w": torch.arange(5)}, tmp_path / "a.pt")
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=False)["w"], torch.arange(5))
    save_pickle({"x": [1, 2]}, tmp_path / "b.pkl")
    with open(tmp_path / "b.pkl", "rb") as f:
        assert pickle.load(f) == {"x": [1, 2]}
    assert load_pickle(tmp_path / "b.pkl") == {"x": [1, 2]}
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave nothing behind
    with pytest.raises(TokenmemError):
        load_torch(tmp_path / "b.pkl")  # a pickle is not a torch checkpoint: named, not a torch stack trace


def test_temporary_files_of_killed_writers_are_cleaned_up(tmp_path):
    """A writer killed mid-write leaves ``.<name>.tmp<pid>``; the next write of the same file removes it once its
    process is gone and it is old enough; a live writer's file, and a failed write's own file, are handled too."""
    import os
    import subprocess
    import sys

    from tokenmem.files import STALE_SECONDS, atomic_write

    target = tmp_path / "a.pt"
    code = "import os, pathlib, sys; pathlib.Path(sys.argv[1] + str(os.getpid())).write_bytes(b'half')"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / ".a.pt.tmp")], check=True)  # exits: pid is gone
    (dead,) = tmp_path.glob(".a.pt.tmp*")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".a.pt.tmp{live.pid}"
        alive.write_bytes(b"still writing")
        old = dead.stat().st_mtime - 2 * STALE_SECONDS
        for p in (dead, alive):
            os.utime(p, (old, old))
        save_torch({"w": 1}, target)
        assert not dead.exists() and alive.exists()  # the dead writer's file went, the live one's stayed
    finally:
        live.kill()
        live.wait()
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # the write fails after its temporary file was created
    assert not (tmp_path / f".a.pt.tmp{os.getpid()}").exists()
    assert load_torch(target) == {"w": 1}  # the old file is intact
    observe("writer killed mid-write", "a .tmp<pid> file of a dead process beside a checkpoint",
            "removed by the next write of that file (a live writer's temporary file is kept)")
