"""Planted key/value pairs in real code: the retrieval signal for training and the ``retrieval`` task.

A pair is a definition line ``_SECRET_7 = 48213`` placed early and, later, a query line
``assert _SECRET_7 == 48213``. To answer, a model must find the definition and copy its digits, the
induction/copy behaviour that does not emerge from a few million tokens of plain code (measured before
the language-model issue was filed), so training mixes these pairs in from the start.
"""

from __future__ import annotations

import re

import numpy as np

NAME_STEMS = ("SECRET", "KEY", "TOKEN", "CODE", "PIN", "MAGIC", "SEED", "LIMIT", "PORT", "SALT", "NONCE", "TAG",
              "BASE", "MASK", "OFFSET", "SLOT")
VALUE_DIGITS = 5
CHARS_PER_TOKEN = 3.68  # measured on held-out stdlib files with the shipped tokenizer


def random_name(rng: np.random.Generator, stems=NAME_STEMS) -> str:
    return f"_{stems[int(rng.integers(len(stems)))]}_{int(rng.integers(100))}"


def random_value(rng: np.random.Generator) -> str:
    return "".join(str(int(d)) for d in rng.integers(0, 10, VALUE_DIGITS))


def definition(name: str, value: str) -> str:
    return f"{name} = {value}"


def query_prefix(name: str) -> str:
    """The text a retrieval prompt ends with; the answer is the value's digits."""
    return f"assert {name} == "


def filler_lines(tok, lines: list[str], start: int, tokens: int) -> tuple[list[str], int]:
    """Whole lines of ``lines`` from index ``start`` until they count at least ``tokens`` tokens (each line
    tokenized with its newline, one by one): the code a retrieval prompt puts between its definition and its
    query. Returns the lines and the index after them."""
    body, count, k = [], 0, start
    while count < tokens:
        body.append(lines[k])
        count += len(tok(lines[k] + "\n", add_special_tokens=False)["input_ids"])
        k += 1
    return body, k


def early_retrieval_text(tok, lines: list[str], rng: np.random.Generator, distance: int,
                         lead_chars: int = 150) -> dict | None:
    """A retrieval prompt laid out as the shipped ones (:mod:`tokenmem.zoo.lm_tasks`): whole lines of ``lines``
    from a random one until they count ``lead_chars`` characters, the definition, at least ``distance`` tokens of
    code (:func:`filler_lines`), the query. Returns ``{"text", "lead", "head", "value"}`` (``lead``: the code
    before the definition, ``head``: with the definition), or None when the name occurs in the filler (draw
    again; the random draws are the same either way)."""
    name, value = random_name(rng, ("SECRET",)), random_value(rng)
    start = int(rng.integers(0, len(lines) - 2000))
    lead, chars, k = [], 0, start
    while chars < lead_chars:
        lead.append(lines[k])
        chars += len(lines[k]) + 1
        k += 1
    body, k = filler_lines(tok, lines, k, distance)
    if f"{name} " in "\n".join(body):
        return None
    lead_text = "\n".join(lead) + "\n"
    head = lead_text + definition(name, value) + "\n"
    return {"text": head + "\n".join(body) + "\n" + query_prefix(name), "lead": lead_text, "head": head,
            "value": value}


def distinct_names(rng: np.random.Generator, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = random_name(rng)
        if name not in names:
            names.append(name)
    return names


def indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" "))]


def synthetic_recall(rng: np.random.Generator, n_pairs: int, n_queries: int) -> str:
    """A dense associative-recall text: definitions interleaved with queries of earlier definitions."""
    names = distinct_names(rng, n_pairs)
    values = [random_value(rng) for _ in names]
    lines, defined = [], 0
    queries_left = n_queries
    while defined < n_pairs or queries_left > 0:
        if defined < n_pairs and (defined == 0 or queries_left == 0 or rng.random() < 0.5):
            lines.append(definition(names[defined], values[defined]))
            defined += 1
        else:
            k = int(rng.integers(defined))
            lines.append(query_prefix(names[k]) + values[k])
            queries_left -= 1
    return "\n".join(lines) + "\n"


def plant_pairs(lines: list[str], rng: np.random.Generator, n_pairs: int) -> list[str]:
    """``lines`` of real code with ``n_pairs`` definitions and, each at a random later line, its query."""
    if len(lines) < 2:
        return lines
    names = distinct_names(rng, n_pairs)
    inserts: dict[int, list[str]] = {}
    for name in names:
        value = random_value(rng)
        i = int(rng.integers(0, len(lines) - 1))
        j = int(rng.integers(i + 1, len(lines)))
        inserts.setdefault(i, []).append(indent_of(lines[i]) + definition(name, value))
        inserts.setdefault(j, []).append(indent_of(lines[j]) + query_prefix(name) + value)
    out = []
    for k, line in enumerate(lines):
        out.extend(inserts.get(k, []))
        out.append(line)
    return out


QUERY_RE = re.compile(r"assert _[A-Z]+_\d+ == (\d{%d})" % VALUE_DIGITS)


def target_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the values that query lines must reproduce (the copy targets)."""
    return [m.span(1) for m in QUERY_RE.finditer(text)]


def repeated_words(rng: np.random.Generator, words: list[str], n: int) -> tuple[str, tuple[int, int]]:
    """``n`` random words, then the same words again: the second copy is predictable only by copying
    (the classic trigger for induction heads). Returns the text and the span of the second copy."""
    seq = " ".join(words[int(i)] for i in rng.integers(0, len(words), n))
    text = seq + "\n" + seq + "\n"
    return text, (len(seq) + 1, len(text) - 1)
