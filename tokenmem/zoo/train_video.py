"""Train the shipped tiny video-QA model (``python -m tokenmem.zoo.train_video``) on :mod:`tokenmem.zoo.video_task`.

The model is the real ``LlavaNextVideoForConditionalGeneration`` (LLaVA-NeXT-Video: Zhang et al. 2024, "LLaVA-NeXT:
A Strong Zero-shot Video Understanding Model"; https://github.com/LLaVA-VL/LLaVA-NeXT) at a small size:

- vision tower: a CLIP ViT (Radford et al. 2021) on 48 x 48 frames, 8 px patches, hidden 64, 2 layers, trained from
  scratch; features from its last layer, CLS dropped (``"default"``), LLaVA-NeXT-Video's 2 x 2 average pool ->
  3 x 3 = 9 tokens per frame (216 video tokens for a 24-frame clip); the two-layer MLP projector of LLaVA-1.5;
- language model: the shipped ``stdlib-llama`` (4 layers, hidden 256, :mod:`tokenmem.zoo.train_lm`) with its
  tokenizer plus the ``<image>`` / ``<video>`` special tokens (the colour and direction words of the answers
  tokenize to 1-3 tokens of that code tokenizer with distinct first tokens: " red" | " g" "reen" | " mag" "ent" "a"
  | " left" ...; the tokenizer adds no BOS); 4.9 M
  parameters in all, 18.7 MB in float32 safetensors.

Training follows LLaVA's visual instruction tuning (Liu et al. 2023, "Visual Instruction Tuning"): the prompt is the
one :class:`tokenmem.adapters.video.VideoQA` builds (chat template ``USER: <video>\\n{question} ASSISTANT:`` with
``<video>`` expanded to frames x tokens-per-frame placeholders), the target is `` {answer}</s>`` and the loss is the
cross-entropy on those answer tokens only. All parameters train jointly (AdamW, Loshchilov & Hutter 2019; the new
vision tower and projector at a higher learning rate than the pretrained language model; linear warm-up, then a
cosine to 10 % over the time budget, as in SGDR, Loshchilov & Hutter 2017). A step is ``--batch`` fresh train-split
clips (generated on the fly from ``(seed, step)`` only, so a resumed run sees the batches an uninterrupted one would),
each packed in one row with its three questions sharing the video (:meth:`Encoder.packed`: 24 questions per step
for the cost of ~2,300 tokens).

Learnability (12-minute smoke runs, ``--minutes 12 --threads 1`` under ``nice 19`` beside other training jobs,
killed and ``--resume``-d every ~3.8 minutes; 0.6-0.7 steps/s, 15-20 questions/s while a core is free). The loss
on the answer tokens reaches the answer-prior level (~0.52 nats: the model knows the answer sets) in ~50 steps.
With transformers' N(0, 0.02) initialisation of the new modules, four runs (over three task variants) each learned
one or two of the three question kinds in 12 minutes, which ones varying from run to run; with the fan-in
initialisation of :func:`.video_model._fan_in_init` the run of the final task (seed 0, 516 steps) ended at loss 0.12 and
held-out accuracy through ``VideoQA(..., "full")`` on 60 clips of colour 98 %, circle 52 % (white told apart;
black / magenta / cyan not yet), move 77 % (chance 25 % each). :mod:`.video_task` records how the task got to its
final form. The time budget counts this process's step and evaluation time: on a machine whose cores are taken, fewer
steps fit.

Outputs in ``--out``: ``checkpoint.pt`` (model, optimiser, RNG, step, elapsed; written atomically every
``--save-minutes``), ``log.jsonl`` (loss per step; held-out accuracy, teacher-forced, every ``--eval-minutes``),
``final/`` (a ``from_pretrained`` directory: model, tokenizer with chat template, processor files, ``training.json``
with the held-out accuracy per question kind measured through ``VideoQA(final, "full").ask_many``, i.e. greedy
decoding on tokenmem's real inference path). ``--export PATH`` copies ``final/`` there.

The shipped run (``shapes-llava-video``): peak learning rates 5e-4 (new modules) and 2.5e-4 (language model) over a
50-minute cosine, one thread. With the earlier defaults (2e-3 / 1e-3) stretched over 50 minutes, the loss sat at
~0.37 for 1,400 steps (colour order-blind at 52 %, circle and move at chance): the 12-minute runs above had decayed
their rate by then. Side by side for six minutes, 1e-3 / 5e-4 reached 57 % (teacher-forced, 48 held-out clips) and
5e-4 / 2.5e-4 83 %; the latter ran on: 5,010 steps (40,080 clips), loss 0.05, and through ``VideoQA(..., "full")``
on 300 held-out clips colour 100 %, circle 74.7 %, move 99.3 % (all 91.3 %; chance 25 %).

Regenerate the shipped model (50 min of training plus half a minute of evaluation, one thread)::

    python -m tokenmem.zoo.train_video --out ~/.cache/tokenmem/video --minutes 50 --seed 0 --resume --threads 1 \\
        --lr 5e-4 --lr-lm 2.5e-4 --eval-minutes 3 --export tokenmem/zoo/models/shapes-llava-video

(``--resume`` continues from ``checkpoint.pt`` after a kill; rerunning the same command after the end only
evaluates and exports again.)

``--arch qwen2vl`` trains the second shipped video model, ``shapes-qwen2vl-video``: the real
``Qwen2VLForConditionalGeneration`` (:mod:`tokenmem.zoo.qwen2vl_model`: a Qwen2-VL vision tower of hidden 64 and 4
layers trained from scratch on the same clips resized to 84 x 84 px, 14 px patches over 2 frames, 2 x 2 merged into
9 tokens per temporal patch, 108 video tokens per clip; ``stdlib-llama`` as its language model with M-RoPE
positions), with the same task, questions, held-out clips, schedule and learning rates; the packed rows carry
M-RoPE position ids from the model's ``get_rope_index``, the answers continuing one position after the prompt's
last token as ``generate`` continues them::

    python -m tokenmem.zoo.train_video --arch qwen2vl --vision-layers 4 --mrope-section 2 3 11 \
        --out ~/.cache/tokenmem/qwen2vl-video-b --minutes 50 --seed 0 --resume --threads 1 --lr 5e-4 --lr-lm 2.5e-4 \
        --eval-minutes 3 --export tokenmem/zoo/models/shapes-qwen2vl-video

(5,109 steps in 3,002 s; held-out accuracy through ``Qwen2VLVideoQA(..., "full")`` on 300 clips: colour 100%,
circle 95.7%, move 100%, all 98.6%. The first run, with 2 vision layers and M-RoPE sections (4, 6, 6), never learned
the move question: see :mod:`tokenmem.zoo.qwen2vl_model`.)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from tokenmem.errors import TokenmemError
from tokenmem.files import load_torch, save_torch, trim_jsonl

from . import video_task as task

from .video_model import (PATCH, TINY, Encoder, Spec, _fan_in_init, build_model, build_tokenizer,  # noqa: F401
                          frame_config, save_pretrained)


def train_clips(seed: int, step: int, batch: int, spec: Spec) -> list[task.ShapeClip]:
    """The clips of ``step``: train-split clips drawn from ``(seed, step)`` only."""
    rng = np.random.default_rng([seed, step])
    return [task.make_clip(task.split_seed("train", int(i)), spec.frames, spec.size)
            for i in rng.integers(0, task.SPLIT_SIZE, size=batch)]


def answer_logits(model, inputs: dict, labels: torch.Tensor):
    """Logits [n, vocab] of the answer tokens, their targets [n], and where they are ([b, q-1] bool: position p
    predicts token p + 1); the lm head runs on those positions only."""
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # [b, q, d]
    where = labels[:, 1:] != -100
    return model.lm_head(hidden[:, :-1][where]), labels[:, 1:][where], where


@torch.no_grad()
def teacher_forced_accuracy(model, encoder: Encoder, clips: list[task.ShapeClip], batch: int = 16) -> dict:
    """Per question kind, the share of questions whose answer tokens and end token are all the argmax under
    teacher forcing (packed rows): the same as greedy decoding producing exactly the answer."""
    was = model.training
    model.eval()
    hits = {kind: [] for kind in task.QUESTIONS}
    for s in range(0, len(clips), batch):
        inputs, labels = encoder.packed(clips[s : s + batch])
        logits, target, where = answer_logits(model, inputs, labels)
        right = torch.zeros_like(where)
        right[where] = logits.argmax(-1) == target
        starts = where & ~torch.nn.functional.pad(where, (1, 0))[:, :-1]  # first token of each answer
        segment = starts.long().cumsum(-1)  # [b, q-1]: k on (and after) the k-th answer
        for r in range(labels.shape[0]):
            for k, kind in enumerate(task.QUESTIONS, 1):
                span = where[r] & (segment[r] == k)
                hits[kind].append(bool(right[r][span].all()))
    model.train(was)
    return summarise(hits)


def summarise(hits: dict) -> dict:
    acc = {kind: round(float(np.mean(v)), 4) for kind, v in hits.items() if v}
    acc["all"] = round(float(np.mean([x for v in hits.values() for x in v])), 4)
    return acc


def heldout_items(count: int, spec: Spec) -> list[tuple[task.ShapeClip, str]]:
    clips = task.clips("heldout", count, num_frames=spec.frames, size=spec.size)
    return [(clip, kind) for clip in clips for kind in task.QUESTIONS]


def videoqa_accuracy(path: Path, spec: Spec, count: int, batch: int = 16) -> tuple[dict, list]:
    """Held-out accuracy through ``VideoQA(path, "full")`` (from_pretrained, tokenmem memory, greedy generate)."""
    from tokenmem.adapters.qwen2vl import video_qa

    qa = video_qa(str(path), "full", frames=spec.frames)
    items = heldout_items(count, spec)
    hits, rows = {kind: [] for kind in task.QUESTIONS}, []
    for s in range(0, len(items), batch):
        part = items[s : s + batch]
        answers = qa.ask_many([c.frames for c, _ in part], [task.QUESTIONS[k] for _, k in part], max_new_tokens=6)
        for (clip, kind), ans in zip(part, answers):
            said = ans.text.strip()
            hits[kind].append(said == clip.answer(kind))
            rows.append({"seed": clip.seed, "kind": kind, "answer": clip.answer(kind), "said": said})
    accuracy = summarise(hits)
    accuracy["in_answer_set"] = round(float(np.mean([r["said"] in task.ANSWERS[r["kind"]] for r in rows])), 4)
    return accuracy, rows


# -- training --------------------------------------------------------------------------------------
def learning_rate(peak: float, step: int, progress: float, warmup: int) -> float:
    warm = min(1.0, (step + 1) / warmup)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimiser(model, lr: float, lr_lm: float):
    lm, new = [], []
    for name, p in model.named_parameters():
        (lm if name.startswith(("model.language_model.", "lm_head.")) else new).append(p)
    return torch.optim.AdamW([{"params": new, "peak": lr}, {"params": lm, "peak": lr_lm}], lr=lr,
                             betas=(0.9, 0.98), weight_decay=0.01)


def _save_atomic(obj, path: Path) -> None:
    save_torch(obj, path)  # atomic, with a checksum that load_torch verifies


def _resume(ckpt: Path, log_path: Path, spec: Spec, model, opt) -> tuple[int, float]:
    """Load a checkpoint into ``model``/``opt`` (and torch's RNG), trim the log to it; ``(step, seconds trained)``."""
    state = load_torch(ckpt, "video training checkpoint", "delete it to train from step 0, or restore a copy")
    if state["spec"] != asdict(spec):
        raise TokenmemError(f"{ckpt} was trained with {state['spec']}, this run asks for {asdict(spec)}; "
                            "resume with the same size flags (--tiny, --frames) or choose another --out")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    step, elapsed = state["step"], state["elapsed"]
    trim_jsonl(log_path, step)
    print(f"resumed {ckpt.parent} at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    return step, elapsed


def _optimise(model, opt, encoder: "Encoder", args, spec: Spec, step: int, progress: float) -> torch.Tensor:
    """One optimiser step on the batch of ``step`` (learning rates from ``progress``); returns the loss."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(group["peak"], step, progress, args.warmup)
    inputs, labels = encoder.packed(train_clips(args.seed, step, args.batch, spec))
    logits, target, _ = answer_logits(model, inputs, labels)
    loss = torch.nn.functional.cross_entropy(logits, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def train(args) -> Path | None:
    from tqdm import tqdm

    sizes = {k: v for k, v in (("frames", args.frames), ("vision_layers", args.vision_layers),
                                ("vision_hidden", args.vision_hidden)) if v}
    if args.mrope_section:
        if args.arch != "qwen2vl":
            raise TokenmemError("--mrope-section is a Qwen2-VL setting: add --arch qwen2vl")
        sizes["mrope_section"] = tuple(args.mrope_section)
    spec = Spec(**{**(TINY if args.tiny else {}), **sizes, "arch": args.arch})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    ckpt, log_path = out / "checkpoint.pt", out / "log.jsonl"
    if ckpt.exists() and not args.resume:
        raise TokenmemError(f"{ckpt} exists: pass --resume to continue that run, or choose another --out")
    tok = build_tokenizer(spec.arch)
    model = build_model(spec, tok, args.seed)
    opt = optimiser(model, args.lr, args.lr_lm)
    step, elapsed = 0, 0.0
    if ckpt.exists():
        step, elapsed = _resume(ckpt, log_path, spec, model, opt)
    model.train()
    encoder = Encoder(tok, spec, model)
    evals = task.clips("heldout", args.eval_clips, num_frames=spec.frames, size=spec.size)
    budget = args.minutes * 60

    def finished() -> bool:
        return (args.max_steps is not None and step >= args.max_steps) or elapsed >= budget

    def save() -> None:
        _save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                      "step": step, "elapsed": elapsed, "spec": asdict(spec), "seed": args.seed}, ckpt)

    bar = tqdm(total=args.max_steps if args.max_steps is not None else int(budget), initial=step if args.max_steps
               is not None else int(elapsed), unit="step" if args.max_steps is not None else "s", dynamic_ncols=True,
               disable=args.quiet)
    log = open(log_path, "a")
    last_save = last_eval = time.time()
    smooth, first = None, step
    while not finished():
        if args.stop_after is not None and step - first >= args.stop_after:
            save()  # leave as if killed here (tests of --resume)
            bar.close()
            log.close()
            return None
        t0 = time.time()
        progress = step / args.max_steps if args.max_steps is not None else elapsed / budget
        loss = _optimise(model, opt, encoder, args, spec, step, progress)
        step += 1
        dt = time.time() - t0
        elapsed += dt
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        rec = {"step": step, "loss": round(loss.item(), 4), "lr": round(opt.param_groups[0]["lr"], 7),
               "questions_s": round(args.batch * len(task.QUESTIONS) / dt, 2), "elapsed": round(elapsed, 1)}
        if time.time() - last_eval > args.eval_minutes * 60 or finished():
            te = time.time()
            rec["heldout"] = teacher_forced_accuracy(model, encoder, evals)
            elapsed += time.time() - te  # evaluation counts against the time budget
            last_eval = time.time()
            bar.write(json.dumps(rec))
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.set_postfix(step=step, loss=f"{smooth:.3f}", acc=(rec.get("heldout") or {}).get("all", ""), refresh=False)
        bar.update(1 if args.max_steps is not None else int(elapsed) - bar.n)
        if time.time() - last_save > args.save_minutes * 60 or finished():
            save()
            last_save = time.time()
    bar.close()
    log.close()
    if not ckpt.exists() or load_torch(ckpt, "video training checkpoint")["step"] != step:
        save()
    return finalise(args, spec, model, tok, step, elapsed)


def finalise(args, spec: Spec, model, tok, step: int, elapsed: float) -> Path:
    """Save ``final/``, evaluate it through VideoQA with the full cache, write training.json, export."""
    final = Path(args.out) / "final"
    if final.exists():
        shutil.rmtree(final)
    save_pretrained(model, tok, spec, final)
    shutil.copy(Path(args.out) / "log.jsonl", final / "training_log.jsonl")
    t0 = time.time()
    accuracy, rows = videoqa_accuracy(final, spec, args.final_clips)
    heldout = task.clips("heldout", args.final_clips, num_frames=spec.frames, size=spec.size)
    card = {
        "task": "tokenmem.zoo.video_task", "task_version": task.TASK_VERSION, "trainer": "tokenmem.zoo.train_video",
        "command": "python -m tokenmem.zoo.train_video " + " ".join(args.argv),
        "args": {k: v for k, v in vars(args).items() if k not in ("argv", "out", "export", "quiet", "resume")},
        "seed": args.seed, "steps": step, "batch_clips": args.batch, "train_clips": step * args.batch,
        "train_questions": step * args.batch * len(task.QUESTIONS), "lr": args.lr, "lr_lm": args.lr_lm,
        "warmup": args.warmup, "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        "train_seconds": round(elapsed, 1), "threads": args.threads, "spec": asdict(spec),
        "tokens_per_frame": spec.tokens_per_frame, "video_tokens_per_clip": spec.video_tokens,
        "event_frame_share": round(float(np.mean([len(c.events) / spec.frames for c in heldout])), 4),
        "heldout_clips": args.final_clips, "heldout_seeds": [heldout[0].seed, heldout[-1].seed],
        "heldout_accuracy_full_cache": accuracy, "chance": task.CHANCE, "order_blind_baseline": task.ORDER_BLIND,
        "evaluation": "VideoQA(model, 'full').ask_many, greedy, exact match of the stripped answer",
        "eval_seconds": round(time.time() - t0, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_mb": round((final / "model.safetensors").stat().st_size / 2**20, 2),
        "examples": rows[:12],
    }
    (final / "training.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({k: card[k] for k in ("steps", "train_seconds", "heldout_accuracy_full_cache", "chance",
                                           "model_mb")}), flush=True)
    if args.export:
        export = Path(args.export)
        if export.exists():
            if not (export / "training.json").exists():
                raise TokenmemError(f"--export {export} exists and is not an earlier export (no training.json); "
                                    "remove it or choose another path")
            shutil.rmtree(export)
        shutil.copytree(final, export)
        print(f"exported to {export}", flush=True)
    return final


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv=None) -> Path | None:
    """The command line (see the module docstring); returns ``OUT/final``, or None after ``--stop-after``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory: checkpoint.pt, log.jsonl, final/")
    p.add_argument("--minutes", type=float, default=50.0, help="training time budget (evaluations included)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (schedule by steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when there is one")
    p.add_argument("--export", default=None, help="copy the final from_pretrained directory here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="clips per step (each with its three questions)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the vision tower and projector")
    p.add_argument("--lr-lm", type=float, default=2.5e-4, help="peak learning rate of the language model")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--save-minutes", type=float, default=3.0)
    p.add_argument("--eval-minutes", type=float, default=4.0)
    p.add_argument("--eval-clips", type=int, default=48, help="held-out clips for the periodic (teacher-forced) eval")
    p.add_argument("--final-clips", type=int, default=300, help="held-out clips for the final VideoQA evaluation")
    p.add_argument("--arch", choices=["llava", "qwen2vl"], default="llava",
                   help="llava: LlavaNextVideoForConditionalGeneration (shapes-llava-video); qwen2vl: "
                        "Qwen2VLForConditionalGeneration (shapes-qwen2vl-video)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model and 16-frame clips (tests)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 24; 16 with --tiny)")
    p.add_argument("--vision-layers", type=int, default=None, help="vision tower layers (default 2)")
    p.add_argument("--vision-hidden", type=int, default=None, help="vision tower width (default 64)")
    p.add_argument("--mrope-section", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="Qwen2-VL: rotary frequencies given to the temporal, height and width axes, highest first "
                        "(sum: head dim / 2 = 16; default 2 3 11)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave after this many steps of this invocation, as if killed (to test --resume)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        return train(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their own setting


if __name__ == "__main__":
    main()
