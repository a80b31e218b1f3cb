"""The language NAMM scorer's fitness set (v2): equal-length prompts from the *evolve* split, shipped as data.

Three likelihood tasks (:mod:`tokenmem.plugins.namm.likelihood`) on the shipped ``stdlib-llama``, every prompt
streamed in 128-token chunks with the memory evicting as it goes, as the evaluation does:

* ``code-completion``: a file prefix of exactly :data:`CODE_TOKENS` tokens ending at the end of a line; the answer
  is the next line (``"\\n" + line``, with its indentation, at most :data:`MAX_ANSWER` tokens), teacher-forced.
* ``retrieval``: ``_SECRET_7 = 48213`` planted in real code, ``distance`` tokens of code after it
  (:data:`DISTANCES`), then ``assert _SECRET_7 == ``; the answer is the value's digits. Every prompt is exactly
  :data:`RETRIEVAL_TOKENS` tokens (the filler before the definition is trimmed from the left).
* ``perplexity``: windows of :data:`WINDOW_TOKENS` tokens; every token predicted from what the memory holds.
* ``retrieval-early`` (v3): laid out as the eval split's retrieval prompts (:mod:`tokenmem.zoo.lm_tasks`): about
  150 characters of code, the definition, ``distance`` tokens of code (:data:`EARLY_DISTANCES`, the eval's
  distances), the query. The value sits near the start of the prompt, among its oldest tokens, as in the eval;
  the v2 ``retrieval`` prompts put it 118-917 tokens in, and v2 learned to answer those
  (``benchmarks/results/namm_fitness_tokens.md``) but not the eval's (``benchmarks/results/language.md``).
  Each distance's prompts have one length, ``distance + EARLY_EXTRA`` tokens (trimmed from the left, keeping at
  least :data:`EARLY_LEAD` tokens before the definition), so they batch.

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
from .lm_tasks import DISTANCES as EARLY_DISTANCES  # the eval's retrieval distances (256, 512, 1,024, 1,536)

FITNESS_DIR = DATA_DIR / "namm_fitness"
CODE_TOKENS = 1024
RETRIEVAL_TOKENS = 1152
WINDOW_TOKENS = 512
DISTANCES = (256, 512, 768, 1024)
MAX_ANSWER = 24
COUNTS = {"code-completion": 32, "retrieval": 32, "perplexity": 32, "retrieval-early": 32}
BUDGETS = (0.25, 0.5)
EARLY_EXTRA = 64  # prompt tokens beyond the distance: the lead, the definition and the query
EARLY_LEAD = 8  # at least this many code tokens before the definition
#: The fitness tasks of each scorer version (v2: the shipped ``language-v2``; v3: retrieval laid out as the eval's).
VERSIONS = {"v2": ("code-completion", "retrieval", "perplexity"),
            "v3": ("code-completion", "retrieval-early", "perplexity")}


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


def _retrieval_early(tok, files, rng, per_distance) -> list[dict]:
    lines = [line for f in files for line in f.text.split("\n")]
    out = []
    for distance in EARLY_DISTANCES:
        length, made = distance + EARLY_EXTRA, 0
        while made < per_distance:
            prompt = planting.early_retrieval_text(tok, lines, rng, distance)  # laid out as the eval's prompts
            if prompt is None:
                continue
            text, value = prompt["text"], prompt["value"]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            answer = _joint_suffix(tok, text, value)
            cut = len(ids) - length  # tokens trimmed from the left
            definition_at = len(tok(prompt["lead"], add_special_tokens=False)["input_ids"]) - cut
            if cut < 0 or answer is None or definition_at < EARLY_LEAD:
                continue
            between = len(ids) - len(tok(prompt["head"], add_special_tokens=False)["input_ids"])
            out.append({"input_ids": ids[cut:], "answer_ids": answer, "answer": value, "distance": distance,
                        "measured_distance": between, "definition_at": definition_at})
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
    """Write ``{task}.jsonl`` for the four tasks from the evolve split; returns the prompt counts. ``retrieval-early``
    draws from its own random stream, so adding it left the v2 files as they were."""
    from .lm_tasks import _long_files

    files = _long_files("evolve")
    if not files:
        raise TokenmemError("the evolve split has no long files (is the Python standard library installed?)")
    rng = np.random.default_rng([seed, 2])
    built = {"code-completion": _code_completion(tokenizer, files, rng, COUNTS["code-completion"]),
             "retrieval": _retrieval(tokenizer, files, rng, COUNTS["retrieval"] // len(DISTANCES)),
             "perplexity": _perplexity(tokenizer, files, rng, COUNTS["perplexity"])}
    early = np.random.default_rng([seed, 3])
    built["retrieval-early"] = _retrieval_early(tokenizer, files, early,
                                                COUNTS["retrieval-early"] // len(EARLY_DISTANCES))
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


def tasks(model=None, budgets=BUDGETS, limit: int | None = None, batch_size: int = 4, chunk: int = 128,
          version: str = "v2") -> list:
    """The fitness tasks of scorer ``version`` (:data:`VERSIONS`) at every budget, named ``{task}@{percent}``
    (e.g. ``retrieval@25``). ``model``: the model every task runs on (default: the shipped ``stdlib-llama``,
    loaded once); ``limit``: the first ``limit`` prompts of each task (tests; ``retrieval-early``'s file
    lists its distances in order, so its first prompts are the shortest)."""
    if version not in VERSIONS:
        raise TokenmemError(f"unknown NAMM fitness version {version!r}; use one of {', '.join(VERSIONS)}")
    if model is None:
        from transformers import AutoModelForCausalLM

        from . import stdlib_lm_path

        model = AutoModelForCausalLM.from_pretrained(stdlib_lm_path()).eval()
    out = []
    for budget in budgets:
        tag = f"@{round(budget * 100)}" if isinstance(budget, float) else f"@{budget}"
        for name in VERSIONS[version][:2]:
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
