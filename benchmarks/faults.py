"""The faults and bad-input table: runs the tests that inject each fault and writes ``benchmarks/results/faults.md``.

    python benchmarks/faults.py [--out benchmarks/results/faults.md]

Every row is a test that injects the fault (a SIGKILL, a damaged file, a bad argument or input) and checks what
happens; the table gives each row's test, its result in this run and its time. Rows from ``tests/test_faults.py``
describe what the run observed (the step the trainer was killed at, the first words of the error it raised),
recorded by the tests themselves (``TOKENMEM_FAULTS_REPORT``); the other rows describe what their test asserts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (fault, how it is injected, what happens, test) for the tests that do not report their observations
FAULTS = [
    ("NAMM evolution SIGKILLed mid-run", "`tokenmem evolve` (synthetic task) SIGKILLed once a generation's checkpoint "
     "is on disk, then the same command with `--resume`", "only the missing generations run; history, fitness and "
     "the final scorer bit-identical to an uninterrupted run", "tests/test_namm_evolve.py::test_killed_run_resumes_to_the_same_result"),
    ("NAMM likelihood evolution stopped mid-run", "an exception from the per-generation callback after generation 2, "
     "then `resume=True`", "identical final mean, history and fitness",
     "tests/test_namm_fitness.py::test_a_killed_likelihood_evolution_resumes_to_the_same_result"),
    ("video trainer stopped mid-run", "`--stop-after 3` (leaves as if killed after the step-3 checkpoint), then "
     "`--resume`; a resume with other size flags", "weights and losses identical to 6 uninterrupted steps; the "
     "mismatched resume is refused (`was trained with ...`)",
     "tests/test_video_task.py::test_training_loss_falls_and_resume_continues_exactly"),
    ("DT trainer stopped mid-run", "3 steps, then `--steps 6 --resume`", "weights identical to 6 uninterrupted "
     "steps; a rerun without `--resume` is refused", "tests/test_envs.py::test_train_dt_resume_is_exact"),
    ("memory-bank spill file damaged", "a byte of a spilled chunk flipped / the file truncated / deleted, then a "
     "forward call that retrieves from it", "`BankError` (a TokenmemError) naming the spill file",
     "tests/test_bank.py::test_damaged_spill_file_raises"),
    ("NAMM scorer file wrong or damaged", "scorer.json of another format version / another layout; scorer.safetensors "
     "cut in half", "TokenmemError naming the file: `format version 99`, `params has shape`, `cannot read`",
     "tests/test_namm.py::test_scorer_file_round_trip_and_errors"),
    ("video file missing", "a path that does not exist", "`VideoError`: `does not exist`",
     "tests/test_video_io.py::test_missing_file"),
    ("video file undecodable", "4 KiB of random bytes named .mp4, each reader (decord, PyAV, auto)",
     "`VideoError`: `could not decode ... re-encode it`", "tests/test_video_io.py::test_undecodable_file"),
]

BAD_INPUT = [
    ("NaN / inf in the inputs", "inputs_embeds with one NaN, inf or -inf value, full and h2o memories",
     "`InputError` at layer 0 before anything is stored; keys, values and metadata unchanged; the next clean call "
     "gives the logits of a memory that never saw the bad call",
     "tests/test_errors.py::test_nan_or_inf_inputs_are_refused_and_the_memory_stays_usable"),
    ("NaN / inf anywhere in keys or values (property)", "Hypothesis: random history, NaN/inf at a random (row, head, "
     "token, channel) of keys or values", "`InputError`; keys, values, metadata, evictor state and counters exactly "
     "as before; the next call goes through", "tests/test_properties.py::test_non_finite_keys_or_values_change_nothing"),
    ("NaN keys at a later layer", "layer 1's key projection returns NaN", "`InputError` naming layer 1 and saying "
     "layer 0 took the call; the next call is refused (`stopped part-way`) until `memory.reset()`",
     "tests/test_errors.py::test_nan_at_a_later_layer_asks_for_a_reset"),
    ("a forward call interrupted part-way", "KeyboardInterrupt raised before layer 1's attention", "the next call: "
     "`MemoryStateError` (`layer 0 has seen 8 tokens but layer 1 has seen 0`) instead of a wrong stream",
     "tests/test_errors.py::test_an_interrupted_call_is_caught_at_the_next_one"),
    ("budget of the wrong type or value", "0, -5, 0.0, -0.5, 1.5, 2.0, NaN, inf, 1e9, '256', True, False, [256], "
     "tensor(64)", "`BudgetError` saying what a budget is, with an example", "tests/test_errors.py::test_bad_budget, "
     "tests/test_errors.py::test_more_bad_budgets"),
    ("budget from numpy", "np.int64(64), np.float32(0.5)", "accepted as the int / float budget",
     "tests/test_errors.py::test_budget_from_numpy_is_an_int_budget"),
    ("budget below the protected tokens", "sink budget 4 (4 sinks + 1), 12 adapter-protected tokens at budget 8",
     "`BudgetError` at construction / at the eviction (cache left intact)",
     "tests/test_errors.py::test_budget_smaller_than_protected_tokens_at_construction, "
     "tests/test_errors.py::test_budget_smaller_than_protected_tokens_at_eviction"),
    ("position ids out of order, repeated, restarting", "Hypothesis: random chunkings; position ids shuffled, "
     "repeated, or restarting at 0 every call", "works: the memory (full, or h2o/sink above the stream) gives the "
     "logits of a DynamicCache call for call, and stores the positions as given",
     "tests/test_properties.py::test_without_eviction_the_memory_equals_dynamic_cache"),
    ("batch size changing mid-stream", "a row dropped / rows added after 12 tokens", "`MemoryStateError` (`Create a "
     "new TokenMemory`); memory unchanged; the right batch continues identically",
     "tests/test_errors.py::test_batch_size_changing_mid_stream_keeps_the_memory, "
     "tests/test_errors.py::test_reuse_for_another_batch_size"),
    ("memory used after restore_model", "restore_model(model), then the old memory; then prepare_model(model) "
     "again and the old memory", "TokenmemError both times (`create a new TokenMemory`); a new memory works",
     "tests/test_errors.py::test_memory_used_after_restore_model"),
    ("attention switched away", "model.set_attn_implementation('sdpa') after the memory was made",
     "TokenmemError (`not 'tokenmem'`)", "tests/test_errors.py::test_attention_switched_away_is_detected"),
    ("empty prompt", "input ids of shape (1, 0) to the model, to generate, as an adapter Prompt; no keys to a hand-"
     "driven memory; an empty prompt list", "`InputError` (`without tokens`, `the prompt has no tokens`) / "
     "TokenmemError (`non-empty`); nothing stored", "tests/test_errors.py::test_empty_prompt_is_refused"),
    ("empty video, single-frame video", "frames [0, H, W, 3], a zero-frame Clip, a zero-frame write, a directory "
     "as the video; one frame as an array and as an mp4", "`InputError` (`the video has no frames`), TokenmemError, "
     "`VideoError` (`is a directory`); one frame is answered within budget + interval - 1, and with the full cache "
     "gives plain generate's tokens", "tests/test_errors.py::test_empty_video_is_refused_and_a_single_frame_works"),
    ("more frames asked than the video has", "13 frames from a 12-frame video", "`VideoError` naming the maximum",
     "tests/test_video_io.py::test_too_many_frames_names_the_maximum"),
    ("wrong evictor name", "'lru', 'Sink', 'h20', '', 'sink '", "`UnknownEvictorError` listing the registered "
     "evictors", "tests/test_errors.py::test_unknown_evictor_lists_known_ones, tests/test_errors.py::test_wrong_evictor_names"),
    ("held tokens within budget (property)", "Hypothesis: random chunkings, budgets, intervals, decode spans, "
     "protected sets", "after calls of at most decode_span tokens held <= budget + interval - 1, after longer calls "
     "<= budget; seen counts every token; keys, values, metadata and state stay aligned",
     "tests/test_properties.py::test_decode_span_keeps_held_within_budget_plus_interval, "
     "tests/test_properties.py::test_eviction_invariants"),
]


def run_tests(nodes: list[str], report: Path, xml: Path) -> float:
    env = {**os.environ, "TOKENMEM_FAULTS_REPORT": str(report)}
    start = time.time()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *nodes],
                   cwd=ROOT, env=env, check=False)
    return time.time() - start


def results(xml: Path) -> tuple[dict[str, tuple[str, float]], int, int]:
    """``{test file::test name (no parameters): (outcome, seconds summed over parameters)}``, and the number of
    test cases run and passed."""
    out: dict[str, tuple[str, float]] = {}
    cases = passed = 0
    for case in ET.parse(xml).getroot().iter("testcase"):
        node = case.get("classname").replace(".", "/") + ".py::" + case.get("name").split("[")[0]
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                   else "skipped" if case.find("skipped") is not None else "passed")
        old, seconds = out.get(node, ("passed", 0.0))
        worst = max((old, outcome), key=["passed", "skipped", "failed"].index)
        out[node] = (worst, seconds + float(case.get("time", 0)))
        cases, passed = cases + 1, passed + (outcome == "passed")
    return out, cases, passed


def status(tests: str, outcomes: dict) -> str:
    parts = []
    for node in (t.strip().split("[")[0] for t in tests.split(",")):
        outcome, seconds = outcomes.get(node, ("not run", 0.0))
        parts.append(f"{outcome} ({seconds:.1f} s)")
    return ", ".join(parts)


def cell(text: str, limit: int = 260) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def table(rows, outcomes) -> list[str]:
    lines = ["| fault | how injected | what happens | test | result |", "|---|---|---|---|---|"]
    for fault, how, what, tests in rows:
        names = "<br>".join(f"`{t.strip()}`" for t in tests.split(","))
        lines.append(f"| {cell(fault)} | {cell(how)} | {cell(what)} | {names} | {status(tests, outcomes)} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report, xml = Path(tmp) / "observed.jsonl", Path(tmp) / "junit.xml"
        nodes = sorted({t.strip() for rows in (FAULTS, BAD_INPUT) for *_, tests in rows for t in tests.split(",")})
        seconds = run_tests(["tests/test_faults.py", *nodes], report, xml)
        outcomes, cases, passed = results(xml)
        observed = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    faults = [(o["fault"], o["injected"], o["outcome"], o["test"]) for o in observed] + FAULTS
    lines = [
        f"# Faults and bad input ({datetime.date.today()}, {os.cpu_count()} CPU cores, {platform.machine()}, "
        f"Python {platform.python_version()})",
        "",
        "`python benchmarks/faults.py` (runs `tests/test_faults.py` and the tests named below: "
        f"{passed} of {cases} test cases passed, {seconds:.0f} s wall, load average {os.getloadavg()[0]:.1f} at the "
        "end; the times below are that run's).",
        "",
        "Rows from `tests/test_faults.py` say what that run observed (the step a trainer was killed at, the first "
        "words of the error); the others say what their test asserts. Every error is a `TokenmemError` subclass, "
        "raised before anything already written is changed.",
        "",
        "## Faults: killed trainers, damaged files",
        "",
        *table(faults, outcomes),
        "",
        "## Bad input",
        "",
        *table(BAD_INPUT, outcomes),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    failed = [node for node, (outcome, _) in outcomes.items() if outcome == "failed"]
    if failed:
        print("FAILED:", *failed, sep="\n  ", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
