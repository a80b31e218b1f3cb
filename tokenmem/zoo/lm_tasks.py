"""Long-context language tasks on held-out standard-library files (LongBench-style), shipped as data.

Three tasks, each a :class:`~tokenmem.plugins.namm.tasks.PromptTask` the NAMM evolution can use as
fitness, all fed by a streaming prefill (``chunk`` tokens at a time, the memory evicting as it goes):

* ``code-completion`` (LongBench's LCC): a long file prefix (1,000-1,900 tokens) ending at the end of a
  line -> the next line; metric: edit similarity (1 - Levenshtein distance / longer length, as in
  RepoBench/LCC evaluations), averaged over prompts.
* ``retrieval``: ``_SECRET_7 = 48213`` planted near the start of real code, ``distance`` tokens of real
  code after it, then ``assert _SECRET_7 == `` -> the value; metric: exact match. Graded by distance.
* ``perplexity``: held-out windows of 2,048 tokens; token-level loss of every chunk given what the memory
  holds. Score ``exp(-loss)`` (higher is better); :func:`perplexity` reports the perplexity itself.

The prompts are built once by :func:`build_task_files` from the held-out split and shipped as JSON-lines
files (text and token ids), so every machine evaluates the same prompts regardless of its Python version.
Files are split between ``evolve`` (training the scorer) and ``eval`` (reporting): even-indexed long
held-out files feed ``evolve``, odd-indexed ones ``eval``, so the two never share a file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..compat import cache_kwargs
from ..errors import TokenmemError
from ..plugins.namm.tasks import PromptTask, register_task
from . import DATA_DIR, planting
from .corpus import iter_files

TASK_DIR = DATA_DIR / "lm_tasks"
SPLITS = ("evolve", "eval")
# Further sets of one task: ``select`` (retrieval prompts drawn from the *evolve* files, for choosing the memory
# bank's defaults: benchmarks/bank_select.py) and ``thirdparty`` (a held-out set on other code,
# tokenmem.zoo.thirdparty). SPLIT_SOURCE says which files each split is drawn from: selection code reads only
# splits whose source is "evolve".
EXTRA_SPLITS = {"select": ("retrieval",), "thirdparty": ("retrieval",)}
SPLIT_SOURCE = {"evolve": "evolve", "select": "evolve", "eval": "eval", "thirdparty": "thirdparty"}
SELECT_PER_DISTANCE = 12
DISTANCES = (256, 512, 1024, 1536)
MIN_FILE_CHARS = 8000


def edit_similarity(a: str, b: str) -> float:
    """``1 - levenshtein(a, b) / max(len(a), len(b))``; 1.0 for two empty strings."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def completion_line(generated: str) -> str:
    """The line a code-completion answer proposes: the text after the first newline, up to the next one
    (the prompt ends at the end of a line, so the model's first newline starts the predicted line)."""
    if "\n" not in generated:
        return ""
    return generated.split("\n", 2)[1].strip()


def retrieved_value(generated: str) -> str:
    """The digits a retrieval answer starts with (leading spaces ignored)."""
    text = generated.lstrip(" ")
    digits = []
    for ch in text:
        if not ch.isdigit():
            break
        digits.append(ch)
    return "".join(digits)


# ---------------------------------------------------------------------------------------------
# Building the shipped files
# ---------------------------------------------------------------------------------------------

def _long_files(split: str):
    files = [f for f in iter_files(split="heldout") if len(f.text) >= MIN_FILE_CHARS]
    return files[0::2] if split == "evolve" else files[1::2]


def _code_completion(tok, files, rng, count) -> list[dict]:
    out = []
    while len(out) < count:
        f = files[int(rng.integers(len(files)))]
        lines = f.text.split("\n")
        target_tokens = int(rng.integers(1000, 1900))
        start = int(rng.integers(0, max(1, len(lines) // 3)))
        ids_needed = 0
        k = start
        text = ""
        while k + 1 < len(lines):
            text = "\n".join(lines[start : k + 1])
            ids_needed = len(text) / planting.CHARS_PER_TOKEN
            if ids_needed >= target_tokens:
                break
            k += 1
        answer = lines[k + 1].strip() if k + 1 < len(lines) else ""
        if ids_needed < 1000 or len(answer.replace(" ", "")) < 8:
            continue
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not 900 <= len(ids) <= 1950:
            continue
        out.append({"text": text, "input_ids": ids, "answer": answer, "file": f.path})
    return out


def _retrieval(tok, files, rng, per_distance) -> list[dict]:
    lines = [line for f in files for line in f.text.split("\n")]
    out = []
    for distance in DISTANCES:
        made = 0
        while made < per_distance:
            prompt = planting.early_retrieval_text(tok, lines, rng, distance)
            if prompt is None:
                continue
            ids = tok(prompt["text"], add_special_tokens=False)["input_ids"]
            between = len(ids) - len(tok(prompt["head"], add_special_tokens=False)["input_ids"])
            out.append({"text": prompt["text"], "input_ids": ids, "answer": prompt["value"], "distance": distance,
                        "measured_distance": between})
            made += 1
    return out


def _perplexity(tok, files, rng, count, length=2048) -> list[dict]:
    out = []
    for f in (files if count else []):
        ids = tok(f.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            s = int(rng.integers(0, len(ids) - length + 1))
            out.append({"input_ids": ids[s : s + length], "file": f.path})
        if len(out) == count:
            break
    return out


def build_task_files(tokenizer, out_dir: Path = TASK_DIR, seed: int = 0) -> dict[str, int]:
    """Write ``{task}-{split}.jsonl`` for every task and split; returns the prompt counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    sizes = {"evolve": {"code-completion": 16, "retrieval": 4, "perplexity": 0},
             "eval": {"code-completion": 40, "retrieval": 12, "perplexity": 12}}
    for split in SPLITS:
        files = _long_files(split)
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        built = {"code-completion": _code_completion(tokenizer, files, rng, sizes[split]["code-completion"]),
                 "retrieval": _retrieval(tokenizer, files, rng, sizes[split]["retrieval"]),
                 "perplexity": _perplexity(tokenizer, files, rng, sizes[split]["perplexity"])}
        for name, records in built.items():
            if not records:
                continue
            path = out_dir / f"{name}-{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            counts[f"{name}-{split}"] = len(records)
    return counts


def build_select_file(tokenizer, out_dir: Path = TASK_DIR, seed: int = 0,
                      per_distance: int = SELECT_PER_DISTANCE) -> int:
    """Write ``retrieval-select.jsonl``: retrieval prompts planted in the *evolve* files (a seed of their own, so
    they differ from ``retrieval-evolve``), enough of them (48) to choose the memory bank's defaults on."""
    records = _retrieval(tokenizer, _long_files("evolve"), np.random.default_rng([seed, 11]), per_distance)
    path = Path(out_dir) / "retrieval-select.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def load_records(task: str, split: str, task_dir: Path = TASK_DIR) -> list[dict]:
    path = Path(task_dir) / f"{task}-{split}.jsonl"
    if not path.exists():
        raise TokenmemError(f"no task file {path}; known tasks: {', '.join(TASKS)}; splits: {', '.join(SPLITS)}"
                            " (rebuild with `python -m tokenmem.zoo.lm_tasks`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The tasks
# ---------------------------------------------------------------------------------------------

@dataclass
class LanguageTask(PromptTask):
    """Base for the shipped language tasks: prompts from the shipped files, the shipped model."""

    split: str = "eval"
    limit: int | None = None  # use the first ``limit`` prompts
    chunk: int | None = 128
    budget: int | float | None = 0.5
    records: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.split not in SPLITS and self.name not in EXTRA_SPLITS.get(self.split, ()):
            extra = ", ".join(f"{k} ({', '.join(v)} only)" for k, v in EXTRA_SPLITS.items())
            raise TokenmemError(f"unknown split {self.split!r} for task {self.name!r}; use one of {', '.join(SPLITS)}, "
                                f"or {extra}")
        self.records = load_records(self.name, self.split)[: self.limit]
        self.prompts = [torch.tensor(r["input_ids"]) for r in self.records]

    def _default_model(self) -> None:
        if self.model_path is None:  # the shipped model, resolved only when a model is needed
            from . import stdlib_lm_path

            self.model_path = str(stdlib_lm_path())

    def load_model(self):
        self._default_model()
        return super().load_model()

    def _tokenizer(self):
        if self.tokenizer is None:
            self._default_model()
        return super()._tokenizer()

    def batches(self):  # one prompt per batch, in file order (prompts differ in length)
        return [([i], p[None]) for i, p in enumerate(self.prompts)]

    def decoded(self, outputs) -> list[str]:
        tok = self._tokenizer()
        texts = [""] * len(self.records)
        for out in outputs:
            for i, row in zip(out.index, out.generated):
                texts[i] = tok.decode(row.tolist())
        return texts


@dataclass
class CodeCompletionTask(LanguageTask):
    name: str = "code-completion"
    max_new_tokens: int = 32

    def per_prompt(self, outputs) -> list[float]:
        return [edit_similarity(completion_line(g), r["answer"]) for g, r in zip(self.decoded(outputs), self.records)]

    def score(self, outputs) -> float:
        return float(np.mean(self.per_prompt(outputs)))


@dataclass
class RetrievalTask(LanguageTask):
    name: str = "retrieval"
    max_new_tokens: int = planting.VALUE_DIGITS
    distances: tuple | None = None  # keep only these distances
    per_distance: int | None = None  # keep the first ``per_distance`` prompts of each distance

    def __post_init__(self):
        super().__post_init__()
        seen: dict[int, int] = {}
        keep = []
        for i, r in enumerate(self.records):
            if self.distances is not None and r["distance"] not in self.distances:
                continue
            if self.per_distance is not None and seen.get(r["distance"], 0) >= self.per_distance:
                continue
            seen[r["distance"]] = seen.get(r["distance"], 0) + 1
            keep.append(i)
        self.records = [self.records[i] for i in keep]
        self.prompts = [self.prompts[i] for i in keep]

    def per_prompt(self, outputs) -> list[float]:
        return [float(retrieved_value(g) == r["answer"]) for g, r in zip(self.decoded(outputs), self.records)]

    def score(self, outputs) -> float:
        return float(np.mean(self.per_prompt(outputs)))

    def by_distance(self, outputs) -> dict[int, float]:
        hits = self.per_prompt(outputs)
        out: dict[int, list[float]] = {}
        for h, r in zip(hits, self.records):
            out.setdefault(r["distance"], []).append(h)
        return {d: float(np.mean(v)) for d, v in sorted(out.items())}


@dataclass
class PerplexityTask(LanguageTask):
    """Streaming perplexity: every chunk's tokens are predicted from what the memory holds."""

    name: str = "perplexity"
    max_new_tokens: int = 0

    def feed(self, model, memory, ids):
        step = self.chunk or ids.shape[1]
        nll, count = 0.0, 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, ids.shape[1] - 1, step):
                x = ids[:, s : s + step]
                target = ids[:, s + 1 : s + step + 1]
                logits = model(input_ids=x, **cache_kwargs(model, memory), use_cache=True).logits[:, : target.shape[1]]
                nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(),
                                                               reduction="sum"))
                count += target.numel()
        self._last_feed = {"nll": nll, "count": count, "prefill_s": time.perf_counter() - t0, "decode_s": 0.0,
                           "decode_calls": 0, "held_fraction": memory.stats()["held_fraction"]}
        return None

    def loss(self, outputs) -> float:
        return sum(o.extras["nll"] for o in outputs) / sum(o.extras["count"] for o in outputs)

    def score(self, outputs) -> float:
        return math.exp(-self.loss(outputs))


def perplexity(task: PerplexityTask, outputs) -> float:
    return math.exp(task.loss(outputs))


TASKS = {"code-completion": CodeCompletionTask, "retrieval": RetrievalTask, "perplexity": PerplexityTask}


def get_language_task(name: str, **options) -> LanguageTask:
    if name not in TASKS:
        raise TokenmemError(f"unknown language task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](**options)


def _evolve_split_factory(name: str):
    def factory(seed: int = 0, **options) -> LanguageTask:
        options.setdefault("split", "evolve")
        return get_language_task(name, **options)

    return factory


for _name in ("code-completion", "retrieval"):  # `tokenmem evolve --task code-completion` (the evolve split)
    register_task(_name, _evolve_split_factory(_name))


def main(argv=None) -> None:
    import argparse

    from transformers import AutoTokenizer

    from . import stdlib_lm_path

    p = argparse.ArgumentParser(description="Rebuild the shipped language-task files from the held-out split")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the shipped model's)")
    p.add_argument("--out", default=str(TASK_DIR))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or stdlib_lm_path())
    print(build_task_files(tok, Path(args.out), args.seed))
    print({"retrieval-select": build_select_file(tok, Path(args.out), args.seed)})


if __name__ == "__main__":
    main()
