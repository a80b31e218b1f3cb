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


TARGET_WEIGHT = 4.0

PHASES = (
    Phase(0.25, 256, 32, 0.75, (1, 6)),
    Phase(0.45, 512, 16, 0.3, (1, 8)),
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
    """All lines of a split, one stream; windows start at random lines. ``words``: the split's distinct
    whitespace-separated words (material for repeated-word runs)."""

    def __init__(self, split: str):
        self.lines: list[str] = []
        for f in iter_files(split=split):
            self.lines.extend(f.text.splitlines())
        self.words = sorted({w for line in self.lines[::7] for w in line.split() if len(w) < 20})

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


def make_batch(tok, code: CodeLines, seed: int, step: int, ph: Phase) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[batch, seq_len]`` and per-token loss weights (``TARGET_WEIGHT`` on the tokens only
    copying can predict: the values of query lines and the second copy of repeated word runs, 1 elsewhere,
    0 on padding)."""
    rng = np.random.default_rng([seed, step])
    texts, spans = [], []
    for _ in range(ph.batch):
        parts, sp, chars = [], [], 0
        if rng.random() < ph.synthetic:
            while chars < ph.seq_len * 4:
                if rng.random() < 0.4:
                    text, span = planting.repeated_words(rng, code.words, int(rng.integers(6, 25)))
                    sp.append((chars + span[0], chars + span[1]))
                else:
                    n = int(rng.integers(4, 17))
                    text = planting.synthetic_recall(rng, n, int(rng.integers(n, 2 * n + 1)))
                    sp += [(chars + x, chars + y) for x, y in planting.target_spans(text)]
                parts.append(text)
                chars += len(text)
            text = "".join(parts)
        else:
            lines = code.window(rng, int(ph.seq_len * planting.CHARS_PER_TOKEN * 1.15))
            n_pairs = int(rng.integers(ph.pairs[0], ph.pairs[1] + 1))
            text = "\n".join(planting.plant_pairs(lines, rng, n_pairs)) + "\n"
            sp = planting.target_spans(text)
        texts.append(text)
        spans.append(sp)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.full((ph.batch, ph.seq_len), tok.pad_token_id, dtype=torch.long)
    weights = torch.zeros(ph.batch, ph.seq_len)
    for i, (row, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        n = min(len(row), ph.seq_len)
        ids[i, :n] = torch.tensor(row[:n])
        weights[i, :n] = 1.0
        starts = np.array([o[0] for o in offsets[:n]])
        for x, y in spans[i]:
            weights[i, :n][torch.from_numpy((starts >= x) & (starts < y))] = TARGET_WEIGHT
    return ids, weights


def weighted_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy weighted per target token (weights of the predicted tokens)."""
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    w = weights[:, 1:].flatten()
    return (ce * w).sum() / w.sum()


@torch.no_grad()
def synthetic_digit_accuracy(model, tok, seed: int, count: int = 16) -> float:
    """Share of query-value digits predicted right (teacher forcing) in dense synthetic recall texts."""
    model.eval()
    rng = np.random.default_rng([seed, 99])
    hits = total = 0
    for _ in range(count):
        text = planting.synthetic_recall(rng, 8, 12)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        pred = model(input_ids=ids).logits[0].argmax(-1)
        for x, y in planting.target_spans(text):
            for k, (a, _) in enumerate(enc["offset_mapping"]):
                if x <= a < y and k > 0:
                    total += 1
                    hits += int(pred[k - 1] == ids[0, k])
    model.train()
    return round(hits / max(1, total), 3)


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
        batch, weights = make_batch(tok, train_lines, args.seed, step, ph)
        ts = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = weighted_loss(model(input_ids=batch).logits, batch, weights)
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
            rec["synthetic_digits"] = synthetic_digit_accuracy(model, tok, args.seed)
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


def unigram_perplexity(tok, train_lines: CodeLines, windows: list[list[int]]) -> float:
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


def plot_log(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    steps = [r["step"] for r in recs]
    a.plot(steps, [r["loss"] for r in recs], lw=0.6, alpha=0.6, label="train loss (curriculum batch)")
    ev = [r for r in recs if "heldout_loss" in r]
    a.plot([r["step"] for r in ev], [r["heldout_loss"] for r in ev], "o-", label="held-out code loss (1,024 tokens)")
    for ph in PHASES[:-1]:
        a.axvline(ph.until * steps[-1], color="grey", ls=":", lw=0.8)
    a.set_xlabel("step"); a.set_ylabel("loss (nats/token)"); a.set_ylim(0, 8); a.legend(); a.grid(alpha=0.3)
    for d in (64, 256, 1024):
        b.plot([r["step"] for r in ev], [100 * r[f"retrieval@{d}"] for r in ev], "o-", label=f"distance {d}")
    b.set_xlabel("step"); b.set_ylabel("retrieval exact match (%)"); b.legend(); b.grid(alpha=0.3)
    fig.suptitle("stdlib-llama training (dotted: curriculum phase boundaries)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def finalize(args) -> None:
    """Copy the trained model into the package with its card, log, manifest and loss curve."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import STDLIB_LM

    work = Path(args.work)
    src = work / "final"
    if not (src / "config.json").exists():
        raise SystemExit(f"no finished run in {src}; train first")
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    windows = heldout_windows(tok)
    ppl = heldout_perplexity(model, windows)
    uni = unigram_perplexity(tok, CodeLines("train"), windows)
    if STDLIB_LM.exists():
        shutil.rmtree(STDLIB_LM)
    STDLIB_LM.mkdir(parents=True)
    model.save_pretrained(STDLIB_LM)
    tok.save_pretrained(STDLIB_LM)
    shutil.copy(work / "log.jsonl", STDLIB_LM / "training_log.jsonl")
    shutil.copy(work / "manifest.json", STDLIB_LM / "corpus_manifest.json")
    plot_log(work / "log.jsonl", STDLIB_LM / "loss_curve.png")
    recs = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in recs if "heldout_loss" in r][-1]
    card = {"held_out_perplexity": round(ppl, 3), "unigram_perplexity": round(uni, 3),
            "held_out_tokens": sum(len(w) - 1 for w in windows), "steps": recs[-1]["step"],
            "train_tokens": int(sum(ph_tokens(r) for r in recs)), "train_seconds": recs[-1]["elapsed"],
            "final_retrieval": {k: v for k, v in last.items() if k.startswith("retrieval@")},
            "seed": args.seed, "command": "python -m tokenmem.zoo.train_lm --steps %d --seed %d" % (recs[-1]["step"], args.seed),
            "parameters": sum(p.numel() for p in model.parameters())}
    (STDLIB_LM / "training.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps(card, indent=1))


def ph_tokens(rec: dict) -> int:
    ph = next(p for p in PHASES if p.seq_len == rec["seq_len"])
    return ph.seq_len * ph.batch


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
    p.add_argument("--finalize", action="store_true",
                   help="after training: evaluate and copy the model into tokenmem/zoo/models/stdlib-llama")
    args = p.parse_args(argv)
    finalize(args) if args.finalize else train(args)


if __name__ == "__main__":
    main()
