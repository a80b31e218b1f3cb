"""``tokenmem demo``: the memory at work on the shipped models.

:func:`run` loads the language model tokenmem trains and ships (``tokenmem/zoo/models/stdlib-llama``) with
the real ``from_pretrained`` and runs two held-out prompts under every evictor; :func:`video` asks each shipped
video model (LLaVA-NeXT-Video and Qwen2-VL) three questions about a generated clip, full cache vs h2o and the
language-trained NAMM scorer at 25%;
:func:`hopper` then rolls out the shipped Decision Transformer for one Hopper-v5 episode, full history vs the
same scorer at 60 tokens.

``quick=True`` (``tokenmem demo --quick``) runs the same three parts smaller: three memories on language (full,
h2o, sink + memory bank), full cache and NAMM on video, 100 Hopper steps. It still loads every shipped model, the
scorer and the task data, so it checks an installation (the wheel test runs it outside the repository).
"""

from __future__ import annotations

import contextlib
import time

import torch

QUICK_LANGUAGE = ("full", "h2o", "sink + memory bank")  # an attention-mass evictor and the bank; NAMM: video, RL
QUICK_STEPS = 100


@contextlib.contextmanager
def quiet_loading():
    """Hide transformers' weight-loading progress bars (restored afterwards); the demo prints its own progress."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class Progress:
    """``[k/3] part ...`` before each part and ``[k/3] done in N s`` after it (stdout, flushed)."""

    def __init__(self, parts: int = 3):
        self.parts, self.index, self.start = parts, 0, None
        self.t0 = time.perf_counter()

    def begin(self, text: str) -> None:
        self.index += 1
        self.start = time.perf_counter()
        print(f"\n[{self.index}/{self.parts}] {text}", flush=True)

    def end(self) -> None:
        now = time.perf_counter()
        print(f"[{self.index}/{self.parts}] done in {now - self.start:.0f} s (demo so far {now - self.t0:.0f} s)",
              flush=True)


def run(model_path: str | None = None, budget: float = 0.25, quick: bool = False, threads: int | None = 1) -> int:
    """The main job: the shipped standard-library model answers two held-out long-context prompts
    (a planted value ~1,000 tokens back, and the next line of a long file) with the full cache and with
    every evictor at ``budget`` of the context, fed in 128-token chunks as a deployed memory would be;
    then :func:`video` and :func:`hopper`. ``quick``: fewer memories and a shorter episode (see the module).
    ``threads``: torch threads while it runs (default 1, as ``tokenmem bench``: the models are small, and a second
    OpenMP thread stalls whenever another process takes its core; None keeps torch's setting)."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        from tokenmem.errors import TokenmemError

        raise TokenmemError(f"demo threads must be a positive int (or None: torch's setting), got {threads!r}")
    progress = Progress(parts=4)  # language, video (LLaVA-NeXT-Video), video (Qwen2-VL), RL
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        _run(model_path, budget, quick, progress)
    finally:
        torch.set_num_threads(before)
    return 0


def _run(model_path, budget, quick, progress) -> None:
    with quiet_loading():
        language(model_path, budget, quick, progress)
        for arch, name in (("llava", "LLaVA-NeXT-Video"), ("qwen2vl", "Qwen2-VL")):
            progress.begin(f"video: {2 if quick else 3} memories x 3 questions about one clip, shipped {name} model")
            video(quick=quick, arch=arch)
            progress.end()
        progress.begin("RL: 2 memories x one Hopper-v5 episode" + (f" (at most {QUICK_STEPS} steps)" if quick else "")
                       + ", shipped Decision Transformer")
        hopper(max_steps=QUICK_STEPS if quick else None)
        progress.end()


def language(model_path: str | None, budget: float, quick: bool, progress: Progress) -> None:
    """Part 1 of :func:`run`: every evictor (``quick``: three memories) on the two held-out prompts."""
    from tokenmem.memory import TokenMemory
    from tokenmem.zoo import stdlib_lm_path
    from tokenmem.zoo.lm_tasks import CodeCompletionTask, RetrievalTask, completion_line, retrieved_value

    path = str(model_path or stdlib_lm_path())
    from transformers import AutoModelForCausalLM

    progress.begin(f"language: {len(QUICK_LANGUAGE) if quick else 7} memories x 2 held-out prompts, shipped stdlib Llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    retrieval = RetrievalTask(split="eval", distances=(1024,), limit=None, model_path=path)
    retrieval.records, retrieval.prompts = retrieval.records[:1], retrieval.prompts[:1]
    completion = CodeCompletionTask(split="eval", limit=1, model_path=path)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {path} ({n_params:.1f} M params, trained here on the Python standard library)")
    rec, crec = retrieval.records[0], completion.records[0]
    print(f"retrieval prompt: {len(rec['input_ids'])} tokens; the value of `{rec['text'].rsplit('assert ', 1)[1][:-4]}` "
          f"was set {rec['measured_distance']} tokens back; truth {rec['answer']}")
    print(f"code-completion prompt: {len(crec['input_ids'])} tokens of {crec['file']}; next line: {crec['answer']!r}")
    from tokenmem.bank import Bank
    from tokenmem.plugins.namm import NAMM

    evictors: list[tuple[str, object, object]] = [("full", "full", None), ("recent", "recent", None),
                                                  ("sink", "sink", None), ("separator", "separator", None),
                                                  ("h2o", "h2o", None),
                                                  ("namm (language scorer)", NAMM.pretrained("language"), None),
                                                  ("sink + memory bank", "sink", Bank())]
    if quick:
        evictors = [row for row in evictors if row[0] in QUICK_LANGUAGE]
    print("\n| evictor | budget | KV held | retrieval answer | next line predicted | decode ms/token "
          "| code prompt held, by quarter |")
    print("|---|---|---|---|---|---|---|")
    for label, ev, bank in evictors:
        b = None if ev == "full" else budget

        def factory():
            return TokenMemory(model, ev, budget=b, bank=bank)

        r_out = retrieval.run(model, factory)[0]
        c_out = completion.run(model, factory)[0]
        answer = retrieved_value(retrieval.decoded([r_out])[0])
        line = completion_line(completion.decoded([c_out])[0])
        held = (r_out.extras["held_fraction"] + c_out.extras["held_fraction"]) / 2
        ms = 1000 * c_out.extras["decode_s"] / max(1, c_out.extras["decode_calls"])
        mark = "ok" if answer == rec["answer"] else "wrong"
        quarters = "/".join(f"{q:.0%}" for q in held_by_quarter(c_out.memory, c_out.input_ids.shape[1]))
        print(f"| {label} | {'all' if b is None else f'{b:.0%}'} | {held:.0%} | {answer or '-'} ({mark}) | "
              f"{line[:48]!r} | {ms:.1f} | {quarters} |")
    print("\nKV held: fraction of the tokens seen that the memory held when the prompt ended (mean over layers);"
          "\nby quarter: the share of each quarter of the code prompt (oldest first) held after the answer;"
          "\nthe memory bank keeps evicted tokens in host memory and brings the best-matching chunks back.")
    print("Full tables: python benchmarks/language.py (see README, Results).")
    progress.end()


def held_by_quarter(memory, prompt_len: int) -> list[float]:
    """Share of each quarter of the prompt's tokens (oldest first) the memory holds, mean over layers, rows, heads."""
    counts = torch.zeros(4)
    for layer in memory.layers:
        meta = layer.meta
        pos = meta.position[meta.valid & (meta.position < prompt_len)]
        counts += torch.bincount((pos * 4 // prompt_len).clamp(max=3), minlength=4)[:4].float()
    size = torch.bincount(torch.arange(prompt_len) * 4 // prompt_len, minlength=4)[:4]
    rows_heads = memory.layers[0].meta.position.shape[0] * memory.layers[0].meta.position.shape[1]
    return (counts / (size.clamp_min(1) * len(memory.layers) * rows_heads)).tolist()


def video(model_path: str | None = None, budget: float = 0.25, clip_index: int = 0, quick: bool = False,
          arch: str = "llava") -> list[dict]:
    """The three questions about one generated held-out clip, asked of a shipped video model
    (``arch``: ``"llava"``, shapes-llava-video; ``"qwen2vl"``, shapes-qwen2vl-video) with the full cache and
    with the language-trained NAMM scorer (unchanged) holding
    ``budget`` of the tokens (and h2o at the same budget), the prompt streamed in chunks so that the memory chooses
    while it watches; prints each answer and which frames the memory kept (event frames starred). ``quick``: no h2o row."""
    from tokenmem.plugins.namm import NAMM
    from tokenmem.errors import TokenmemError
    from tokenmem.zoo import video_lm_path, video_qwen2vl_path
    from tokenmem.zoo import video_task as task
    from tokenmem.zoo.transfer import event_token_share, frame_fraction, video_qa

    if arch not in ("llava", "qwen2vl"):
        raise TokenmemError(f"demo video arch must be 'llava' or 'qwen2vl', got {arch!r}")
    path = str(model_path or (video_qwen2vl_path() if arch == "qwen2vl" else video_lm_path()))
    name = ("Qwen2-VL architecture, a temporal patch covers 2 frames" if arch == "qwen2vl"
            else "LLaVA-NeXT-Video architecture")
    clip = task.make_clip(task.heldout_seed(clip_index))
    frames = clip.frames.shape[0]
    events = ", ".join(f"{t}: {k}" for t, k in clip.event_kinds.items())
    print(f"\nVideo QA: {path} ({name}, trained here), held-out clip {clip.seed}: {frames} frames, "
          f"events at {events}; every other frame repeats the last one")
    print("\n| memory | budget | KV held | " + " | ".join(task.QUESTIONS) + " | held video tokens on event frames |")
    print("|---|---|---|---|---|---|---|")
    rows, shared = [], None
    memories = [("full", "full", None), ("h2o", "h2o", budget), ("namm (language scorer)", NAMM.pretrained("language"), budget)]
    for label, evictor, b in memories[::2] if quick else memories:
        qa = shared = video_qa(shared or path, evictor, b, frames)
        answers = qa.ask_many([clip.frames] * len(task.QUESTIONS), list(task.QUESTIONS.values()), max_new_tokens=6)
        said = [a.text.strip() for a in answers]
        marks = [f"{s} ({'ok' if s == clip.answer(k) else 'wrong'})" for s, k in zip(said, task.QUESTIONS)]
        on_events = event_token_share(answers[0].report, clip)
        share = len(answers[0].report.columns_of(clip.events)) / answers[0].report.frames
        held = answers[0].memory.stats()["held_fraction"]
        print(f"| {label} | {'all' if b is None else f'{b:.0%}'} | {held:.0%} | " + " | ".join(marks)
              + f" | {on_events:.0%} (they are {share:.0%} of the video) |")
        rows.append({"memory": label, "answers": said, "event_token_share": on_events, "held": held,
                     "frame_kept": frame_fraction(answers[0].report, frames)})
    print(f"(truth: {', '.join(clip.answer(k) for k in task.QUESTIONS)})")
    per_frame = " ".join(f"{t}{'*' if t in clip.events else ''}:{100 * v:.0f}%" for t, v in enumerate(rows[-1]["frame_kept"]))
    print(f"namm kept of each frame (mean over layers and KV heads; * = event frame): {per_frame}")
    print("Full table over 200 held-out clips and every evictor: tokenmem bench (see README, Results).")
    return rows


def hopper(model_path: str | None = None, budget: int = 60, seed: int = 0, max_steps: int | None = None) -> list[dict]:
    """One Hopper-v5 episode of the shipped Decision Transformer with its full history cached, and with
    the language-trained NAMM scorer (unchanged) holding ``budget`` tokens (``budget // 3`` timesteps);
    prints each return, D4RL-normalised score and the token types the memory held at the end (``max_steps``: the
    episode stops there)."""
    try:
        from tokenmem.envs import make_env, shipped_dt_path
    except ImportError as exc:  # gymnasium / mujoco not installed
        print(f"\nDecision Transformer: skipped ({exc}); `pip install 'tokenmem[rl]'`")
        return []
    from tokenmem.adapters.decision import CachedPolicy, DecisionAdapter
    from tokenmem.envs.rollout import rollout
    from tokenmem.meta import MODALITY_NAMES
    from tokenmem.plugins.namm import NAMM

    path = str(model_path or shipped_dt_path())
    adapter = DecisionAdapter.from_pretrained(path)
    print(f"\nDecision Transformer: {path} on {adapter.env_id}, one episode (seed {seed}), target return "
          f"{adapter.target_return:.0f}")
    print("\n| memory | budget | return | normalised score | steps | tokens held at the end (return/state/action) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for label, evictor, b in (("full history", "full", None), ("namm (language scorer)", NAMM.pretrained("language"), budget)):
        result = rollout(adapter, CachedPolicy(adapter, evictor, b), [make_env(adapter.env_id)], [seed],
                         max_steps=max_steps)
        meta = result.memory.layers[0].meta
        valid = meta.valid[0, 0]
        kinds = [MODALITY_NAMES[int(c)] for c in meta.modality[0, 0][valid].tolist()]
        held = "/".join(str(kinds.count(k)) for k in ("return", "state", "action"))
        row = {"memory": label, "return": float(result.returns[0]), "score": float(result.scores[0]),
               "steps": int(result.lengths[0]), "held": held}
        rows.append(row)
        print(f"| {label} | {'all' if b is None else f'{b} tokens'} | {row['return']:.1f} | {row['score']:.1f} | "
              f"{row['steps']} | {held} |")
    print("Full table over 10 seeds and every evictor: python benchmarks/decision.py (see README).")
    return rows
