"""Train the shipped standard-library language model (``python -m tokenmem.zoo.train_lm``).

A Llama-architecture causal LM (RoPE, grouped-query attention, 2,048-token context, tied embeddings,
4.7 M parameters, 19 MB in float32) trained from scratch on the Python standard library's sources
(:mod:`tokenmem.zoo.corpus`) with the tokenizer of :mod:`tokenmem.zoo.tokenizer`.

Plain code alone does not teach a model this small to copy from far back (measured before the issue was
filed: 0% retrieval after 3.9 M tokens), so the run follows a curriculum (see :data:`PHASES`):

1. dense synthetic associative recall (many ``NAME = value`` definitions and ``assert NAME == value``
   queries per short sequence) mixed with code, at 256 tokens;
2. real code with planted pairs (:func:`tokenmem.zoo.planting.plant_pairs`) at 512 and then 1,024 tokens;
3. code at the full 2,048-token context, still with some planted pairs.

Retrieval exact match (held-out code, pair at a given distance) and held-out loss are measured during
training and written to ``log.jsonl``. The run is resumable: it checkpoints (model, optimiser, step) to
``--work`` atomically every few minutes and restarts from there; each step's data depends only on
``(seed, step)``, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import planting
from .corpus import iter_files, manifest

DEFAULT_WORK = Path(os.environ.get("TOKENMEM_CACHE", Path.home() / ".cache" / "tokenmem")) / "lm"


@dataclass(frozen=True)
class Phase:
    until: float  # fraction of total steps at which the phase ends
    seq_len: int
    batch: int
    synthetic: float  # share of sequences that are pure synthetic recall
    pairs: tuple[int, int]  # planted pairs per code sequence (min, max)


PHASES = (
    Phase(0.20, 256, 32, 0.6, (1, 6)),
    Phase(0.45, 512, 16, 0.25, (1, 8)),
    Phase(0.70, 1024, 8, 0.1, (1, 8)),
    Phase(1.00, 2048, 4, 0.05, (0, 6)),
)


def model_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                       rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)


class CodeLines:
    """All train-split lines, one stream; windows start at random lines."""

    def __init__(self, split: str):
        self.lines: list[str] = []
        for f in iter_files(split=split):
            self.lines.extend(f.text.splitlines())

    def window(self, rng: np.random.Generator, chars: int) -> list[str]:
        start = int(rng.integers(0, len(self.lines) - 1))
        out, total = [], 0
        for line in self.lines[start:]:
            out.append(line)
            total += len(line) + 1
            if total >= chars:
                break
        return out


def phase_at(step: int, total: int) -> Phase:
    for ph in PHASES:
        if step < ph.until * total:
            return ph
    return PHASES[-1]


def make_batch(tok, code: CodeLines, seed: int, step: int, ph: Phase) -> torch.Tensor:
    rng = np.random.default_rng([seed, step])
    texts = []
    for _ in range(ph.batch):
        if rng.random() < ph.synthetic:
            parts, chars = [], 0
            while chars < ph.seq_len * 4:
                n = int(rng.integers(4, 17))
                parts.append(planting.synthetic_recall(rng, n, int(rng.integers(n, 2 * n + 1))))
                chars += len(parts[-1])
            texts.append("".join(parts))
        else:
            lines = code.window(rng, int(ph.seq_len * planting.CHARS_PER_TOKEN * 1.15))
            n_pairs = int(rng.integers(ph.pairs[0], ph.pairs[1] + 1))
            texts.append("\n".join(planting.plant_pairs(lines, rng, n_pairs)) + "\n")
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    out = torch.full((ph.batch, ph.seq_len), tok.pad_token_id, dtype=torch.long)
    for i, row in enumerate(ids):
        row = row[: ph.seq_len]
        out[i, : len(row)] = torch.tensor(row)
    return out


def retrieval_prompts(tok, code: CodeLines, distance: int, count: int, seed: int) -> list[tuple[list[int], str]]:
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
def heldout_loss(model, tok, lines: CodeLines, seq_len: int, count: int, seed: int) -> float:
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


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .tokenizer import build_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer().save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    train_lines, held_lines = CodeLines("train"), CodeLines("heldout")
    (work / "manifest.json").write_text(json.dumps(manifest(iter_files()), indent=0))

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(len(tok)))
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step = 0
    ckpt = work / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)

    def decode_digits(ids):
        return tok.decode(ids)

    evals = {d: retrieval_prompts(tok, held_lines, d, args.eval_prompts, args.seed) for d in (64, 256, 1024)}
    log = open(work / "log.jsonl", "a")
    last_save = time.time()
    t0 = time.time()
    tokens_per_sec = []
    while step < args.steps:
        ph = phase_at(step, args.steps)
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = make_batch(tok, train_lines, args.seed, step, ph)
        labels = batch.masked_fill(batch == tok.pad_token_id, -100)
        ts = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_per_sec.append(batch.numel() / (time.time() - ts))
        step += 1
        rec = {"step": step, "loss": round(loss.item(), 4), "lr": lr, "seq_len": ph.seq_len,
               "tok_s": round(tokens_per_sec[-1]), "elapsed": round(time.time() - t0, 1)}
        if step % args.eval_every == 0 or step == args.steps:
            for d, prompts in evals.items():
                rec[f"retrieval@{d}"] = _exact(model, prompts, decode_digits)
            rec["heldout_loss"] = heldout_loss(model, tok, held_lines, 1024, 16, args.seed)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step % 10 == 0 or "heldout_loss" in rec:
            print(json.dumps(rec), flush=True)
        if time.time() - last_save > args.save_minutes * 60 or step == args.steps:
            _save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            last_save = time.time()
    model.save_pretrained(work / "final")
    tok.save_pretrained(work / "final")
    print("done", flush=True)


@torch.no_grad()
def _exact(model, prompts, decode) -> float:
    model.eval()
    hits = 0
    for ids, value in prompts:
        x = torch.tensor([ids])
        past, out = None, []
        for _ in range(len(value)):
            res = model(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
        hits += int(decode(out).strip() == value)
    model.train()
    return round(hits / max(1, len(prompts)), 3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(DEFAULT_WORK), help="checkpoints, log and final model (outside the repo)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--save-minutes", type=float, default=3.0)
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
