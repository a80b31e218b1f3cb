"""Probes and evaluation of the shipped language model while :mod:`tokenmem.zoo.train_lm` trains it: copy accuracy
(repeated word runs, dense synthetic recall), planted-value retrieval, held-out loss and perplexity (and a unigram
baseline's) on windows of the held-out files. ``code`` / ``lines`` arguments are :class:`.train_lm.CodeLines`."""

from __future__ import annotations

import numpy as np
import torch

from ..compat import cache_kwargs, returned_cache
from . import planting
from .corpus import iter_files


@torch.no_grad()
def copy_accuracy(model, tok, samples) -> float:
    """Share of target tokens predicted right (teacher forcing); ``samples`` yields ``(text, spans)``, the
    character spans of each text whose tokens only copying can predict."""
    model.eval()
    hits = total = 0
    for text, spans in samples:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        pred = model(input_ids=ids).logits[0].argmax(-1)
        for x, y in spans:
            for k, (a, _) in enumerate(enc["offset_mapping"]):
                if x <= a < y and k > 0:
                    total += 1
                    hits += int(pred[k - 1] == ids[0, k])
    model.train()
    return round(hits / max(1, total), 3)



def repeat_accuracy(model, tok, words: list[str], seed: int, count: int = 16) -> float:
    """Copy accuracy on the second copy of repeated word runs."""
    rng = np.random.default_rng([seed, 98])
    runs = (planting.repeated_words(rng, words, 15) for _ in range(count))
    return copy_accuracy(model, tok, ((text, [span]) for text, span in runs))



def synthetic_digit_accuracy(model, tok, seed: int, count: int = 16) -> float:
    """Copy accuracy on the query values of dense synthetic recall texts."""
    rng = np.random.default_rng([seed, 99])
    texts = (planting.synthetic_recall(rng, 8, 12) for _ in range(count))
    return copy_accuracy(model, tok, ((text, planting.target_spans(text)) for text in texts))



def retrieval_prompts(tok, code, distance: int, count: int, seed: int) -> list[tuple[list[int], str]]:
    """Held-out code with one planted pair ``distance`` tokens (approximately) before the query."""
    rng = np.random.default_rng([seed, distance, 7])
    prompts = []
    for _ in range(count):
        name, value = planting.random_name(rng), planting.random_value(rng)
        lines = code.window(rng, int(distance * planting.CHARS_PER_TOKEN))
        lead = code.window(rng, 200)
        text = "\n".join(lead + [planting.definition(name, value)] + lines) + "\n" + planting.query_prefix(name)
        prompts.append((tok(text, add_special_tokens=False)["input_ids"], value))
    return prompts



@torch.no_grad()
def heldout_loss(model, tok, lines, seq_len: int, count: int, seed: int) -> float:
    model.eval()
    rng = np.random.default_rng([seed, 11])
    losses = []
    for _ in range(count):
        text = "\n".join(lines.window(rng, int(seq_len * planting.CHARS_PER_TOKEN * 1.2)))
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:seq_len]])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    model.train()
    return float(np.mean(losses))



@torch.no_grad()
def exact_match(model, prompts, decode) -> float:
    """Share of ``(ids, value)`` prompts whose greedy continuation (``len(value)`` tokens) decodes to ``value``."""
    model.eval()
    hits = 0
    for ids, value in prompts:
        x = torch.tensor([ids])
        past, out = None, []
        for _ in range(len(value)):
            res = model(input_ids=x, **cache_kwargs(model, past), use_cache=True)
            past = returned_cache(res)
            out.append(int(res.logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
        hits += int(decode(out).strip() == value)
    model.train()
    return round(hits / max(1, len(prompts)), 3)



def unigram_perplexity(tok, train_lines, windows: list[list[int]]) -> float:
    """Perplexity of a unigram model (add-one smoothed token frequencies of the train split) on ``windows``."""
    counts = np.ones(len(tok), dtype=np.float64)
    step = 20000
    for i in range(0, len(train_lines.lines), step):
        ids = tok("\n".join(train_lines.lines[i : i + step]), add_special_tokens=False)["input_ids"]
        counts += np.bincount(ids, minlength=len(tok))[: len(tok)]
    logp = np.log(counts / counts.sum())
    nll = [-logp[w[1:]].sum() for w in windows]
    return float(np.exp(sum(nll) / sum(len(w) - 1 for w in windows)))



@torch.no_grad()
def heldout_perplexity(model, windows: list[list[int]]) -> float:
    model.eval()
    nll, count = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        nll += float(model(input_ids=ids, labels=ids).loss) * (len(w) - 1)
        count += len(w) - 1
    return float(np.exp(nll / count))



def heldout_windows(tok, length: int = 2048) -> list[list[int]]:
    """Every held-out file cut into consecutive ``length``-token windows (the last, shorter one kept if
    it has at least 64 tokens)."""
    out = []
    for f in iter_files(split="heldout"):
        ids = tok(f.text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), length):
            if len(ids[s : s + length]) >= 64:
                out.append(ids[s : s + length])
    return out
