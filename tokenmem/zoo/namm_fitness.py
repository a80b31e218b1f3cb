"""The language NAMM scorer's fitness set (v2): equal-length prompts from the *evolve* split, shipped as data.

Three likelihood tasks (:mod:`tokenmem.plugins.namm.likelihood`) on the shipped ``stdlib-llama``, every prompt
streamed in 128-token chunks with the memory evicting as it goes, as the evaluation does:

* ``code-completion``: a file prefix of exactly :data:`CODE_TOKENS` tokens ending at the end of a line; the answer
  is the next line (``"\\n" + line``, with its indentation, at most :data:`MAX_ANSWER` tokens), teacher-forced.
* ``retrieval``: ``_SECRET_7 = 48213`` planted in real code, ``distance`` tokens of code after it
  (:data:`DISTANCES`), then ``assert _SECRET_7 == ``; the answer is the value's digits. Every prompt is exactly
  :data:`RETRIEVAL_TOKENS` tokens (the filler before the definition is trimmed from the left).
* ``perplexity``: windows of :data:`WINDOW_TOKENS` tokens; every token predicted from what the memory holds.

Equal lengths let a task run its prompts in batches (no padding, so a fractional budget keeps the same count in
every row as alone), which is what makes 32+ prompts per task affordable in every CMA-ES evaluation. The files
come only from the evolve split's long held-out files (even-indexed, :func:`tokenmem.zoo.lm_tasks._long_files`),
disjoint by file from the eval split that every report uses. Rebuild: ``python -m tokenmem.zoo.namm_fitness``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import TokenmemError
from ..plugins.namm.likelihood import AnswerLikelihoodTask, StreamingPerplexityTask
from . import DATA_DIR, planting

FITNESS_DIR = DATA_DIR / "namm_fitness"
CODE_TOKENS = 1024
RETRIEVAL_TOKENS = 1152
WINDOW_TOKENS = 512
DISTANCES = (256, 512, 768, 1024)
MAX_ANSWER = 24
COUNTS = {"code-completion": 32, "retrieval": 32, "perplexity": 32}
BUDGETS = (0.25, 0.5)


def _joint_suffix(tok, prefix: str, continuation: str) -> list[int] | None:
    """The ids ``continuation`` adds after ``prefix`` when both are tokenized together, or None when the joint
    tokenization does not start with the prefix's own ids (a merge across the boundary)."""
    a = tok(prefix, add_special_tokens=False)["input_ids"]
    joint = tok(prefix + continuation, add_special_tokens=False)["input_ids"]
    return joint[len(a) :] if joint[: len(a)] == a else None


def _code_completion(tok, files, rng, count) -> list[dict]:
    out = []
    while len(out) < count:
        f = files[int(rng.integers(len(files)))]
        lines = f.text.split("\n")
        k = int(rng.integers(len(lines) // 4, len(lines) - 1))  # the prompt ends with line k
        nxt = lines[k + 1]
        if len(nxt.strip().replace(" ", "")) < 8:
            continue
        start = max(0, k - 600)
        text = "\n".join(lines[start : k + 1])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) < CODE_TOKENS:
            continue
        answer = _joint_suffix(tok, text, "\n" + nxt)
        if not answer:
            continue
        out.append({"input_ids": ids[-CODE_TOKENS:], "answer_ids": answer[:MAX_ANSWER], "answer": nxt.strip(),
                    "file": f.path, "line": k + 1})
    return out


def _retrieval(tok, files, rng, per_distance) -> list[dict]:
    lines = [line for f in files for line in f.text.split("\n")]
    out = []
    for distance in DISTANCES:
        made = 0
        while made < per_distance:
            name, value = planting.random_name(rng, ("SECRET",)), planting.random_value(rng)
            start = int(rng.integers(0, len(lines) - 4000))
            body, _ = planting.filler_lines(tok, lines, start + 400, distance)  # after 400 lines of filler (trimmed below)
            if f"{name} " in "\n".join(body):
                continue
            head = "\n".join(lines[start : start + 400] + [planting.definition(name, value)]) + "\n"
            text = head + "\n".join(body) + "\n" + planting.query_prefix(name)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            answer = _joint_suffix(tok, text, value)
            if len(ids) < RETRIEVAL_TOKENS or answer is None:
                continue
            between = len(ids) - len(tok(head, add_special_tokens=False)["input_ids"])
            if between > RETRIEVAL_TOKENS - 64:
                continue
            out.append({"input_ids": ids[-RETRIEVAL_TOKENS:], "answer_ids": answer, "answer": value,
                        "distance": distance, "measured_distance": between})
            made += 1
    return out


def _perplexity(tok, files, rng, count) -> list[dict]:
    tokenized = [(f.path, tok(f.text, add_special_tokens=False)["input_ids"]) for f in files]
    tokenized = [(p, ids) for p, ids in tokenized if len(ids) >= WINDOW_TOKENS]
    out = []
    while len(out) < count:
        path, ids = tokenized[int(rng.integers(len(tokenized)))]
        s = int(rng.integers(0, len(ids) - WINDOW_TOKENS + 1))
        out.append({"input_ids": ids[s : s + WINDOW_TOKENS], "file": path, "start": s})
    return out


def build(tokenizer, out_dir: Path = FITNESS_DIR, seed: int = 0) -> dict[str, int]:
    """Write ``{task}.jsonl`` for the three tasks from the evolve split; returns the prompt counts."""
    from .lm_tasks import _long_files

    files = _long_files("evolve")
    if not files:
        raise TokenmemError("the evolve split has no long files (is the Python standard library installed?)")
    rng = np.random.default_rng([seed, 2])
    built = {"code-completion": _code_completion(tokenizer, files, rng, COUNTS["code-completion"]),
             "retrieval": _retrieval(tokenizer, files, rng, COUNTS["retrieval"] // len(DISTANCES)),
             "perplexity": _perplexity(tokenizer, files, rng, COUNTS["perplexity"])}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in built.items():
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {name: len(records) for name, records in built.items()}


def load(task: str, data_dir: Path = FITNESS_DIR) -> list[dict]:
    path = Path(data_dir) / f"{task}.jsonl"
    if not path.exists():
        raise TokenmemError(f"no fitness file {path}; rebuild with `python -m tokenmem.zoo.namm_fitness`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tasks(model=None, budgets=BUDGETS, limit: int | None = None, batch_size: int = 4, chunk: int = 128) -> list:
    """The fitness tasks at every budget, named ``{task}@{percent}`` (e.g. ``retrieval@25``). ``model``: the
    model every task runs on (default: the shipped ``stdlib-llama``, loaded once); ``limit``: the first
    ``limit`` prompts of each task (tests)."""
    if model is None:
        from transformers import AutoModelForCausalLM

        from . import stdlib_lm_path

        model = AutoModelForCausalLM.from_pretrained(stdlib_lm_path()).eval()
    out = []
    for budget in budgets:
        tag = f"@{round(budget * 100)}" if isinstance(budget, float) else f"@{budget}"
        for name in ("code-completion", "retrieval"):
            records = load(name)[:limit]
            out.append(AnswerLikelihoodTask(name=name + tag, prompts=[r["input_ids"] for r in records],
                                            answers=[r["answer_ids"] for r in records], budget=budget, chunk=chunk,
                                            batch_size=batch_size, model=model))
        records = load("perplexity")[:limit]
        out.append(StreamingPerplexityTask(name="perplexity" + tag, prompts=[r["input_ids"] for r in records],
                                           budget=budget, chunk=chunk, batch_size=batch_size, model=model))
    return out


def main(argv=None) -> None:
    import argparse

    from transformers import AutoTokenizer

    from . import stdlib_lm_path

    p = argparse.ArgumentParser(description="Rebuild the NAMM fitness files from the evolve split")
    p.add_argument("--out", default=str(FITNESS_DIR))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build(AutoTokenizer.from_pretrained(stdlib_lm_path()), Path(args.out), args.seed))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
