"""Zero-shot transfer, measured: every evictor on language, video and RL with the shipped models (``tokenmem bench``).

One scorer file, ``NAMM.pretrained("language")`` (evolved on the shipped standard-library Llama's code completion and
retrieval, :mod:`tokenmem.zoo.evolve_language`), is used unchanged on three modalities, next to the training-free
evictors, at the same budgets (a fraction of the tokens seen, so every row holds the same share of its context):

- **language**: the shipped ``stdlib-llama`` on the *eval* split of :mod:`tokenmem.zoo.lm_tasks` (the scorer was
  evolved on the disjoint *evolve* split): code completion (edit similarity x100) and retrieval of a planted value
  (exact match x100), prompts fed in 128-token chunks with eviction after each. Score: the mean of the two.
- **video**: the shipped ``shapes-llava-video`` (a ``LlavaNextVideoForConditionalGeneration`` trained here,
  :mod:`tokenmem.zoo.train_video`) answering the three questions of held-out clips of :mod:`tokenmem.zoo.video_task`
  through :class:`~tokenmem.adapters.video.VideoQA`, the prompt fed in ``VIDEO_CHUNK``-token chunks with eviction
  after each (the memory chooses while it watches, before the question arrives). Score: accuracy x100 (chance 25).
  Also measured: the share of the held video tokens that lie on *event* frames (frames that show something new)
  against the event frames' share of the video: above it, an evictor drops redundant frames first.
- **video-qwen2vl**: the same clips and questions asked of the shipped ``shapes-qwen2vl-video`` (a
  ``Qwen2VLForConditionalGeneration`` trained here the same way, ``train_video --arch qwen2vl``) through
  :class:`~tokenmem.adapters.qwen2vl.Qwen2VLVideoQA`: M-RoPE positions, 3-D patches of two frames (a temporal
  patch is a segment; the event share counts a patch as an event patch when either of its frames is an event).
- **rl**: the shipped Hopper Decision Transformer (:mod:`tokenmem.envs`) rolled out with its whole history cached
  (``full``) or under a budget. Score: D4RL-normalised return (mean over seeds). Also measured: the token types
  (return / state / action) held at the end of the episodes.

``separator`` runs where separators exist: on text. Video tokens carry no separator token and a Decision
Transformer has none, so there SepLLM reduces to its initial and recent tokens and is not reported.

Columns of every row: the task score, the mean KV fraction held (held / seen when the prompt or episode ended, mean
over layers; NAMM's masked slots count as held) and the throughput (language: tokens/s of prefill + decode; video:
questions/s; rl: environment steps/s, physics included). :mod:`tokenmem.zoo.transfer_report` writes the markdown
table, the claims checked on the rows, and the plots.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import TokenmemError
from ..evictor_list import add_evictors_argument, check_evictors, registered

MODALITIES = ("language", "video", "video-qwen2vl", "rl")
BUDGETS = (0.25, 0.5)
SEPARATOR_MODALITIES = ("language",)
VIDEO_CHUNK = 32  # prompt tokens per prefill call in video QA (about 3.5 frames of 9 tokens)
VIDEO_BATCH = 12  # questions per ask_many call
#: items per modality for each size: language prompts (code completion, retrieval), video clips, rl episodes
#: (and the longest rl episode, None: the environment's 1,000 steps)
SIZES = {
    "full": {"code-completion": 40, "retrieval": 48, "clips": 200, "episodes": 20, "max_steps": None},
    "quick": {"code-completion": 16, "retrieval": 16, "clips": 50, "episodes": 5, "max_steps": None},
    "smoke": {"code-completion": 1, "retrieval": 4, "clips": 2, "episodes": 1, "max_steps": 60},
}


@dataclass
class Row:
    modality: str
    evictor: str
    budget: float | None  # None: full cache
    score: float  # the modality's task metric (see the module docstring)
    score_std: float | None  # over items (rl: over seeds), None where not meaningful
    kv_fraction: float
    throughput: float
    throughput_unit: str
    seconds: float
    items: int
    metrics: dict = field(default_factory=dict)  # per-task / per-question-kind scores
    details: dict = field(default_factory=dict)  # what the memory kept (video frames, rl token types)


def _evictor(name: str, scorer):
    return scorer if name == "namm" else name


def configs(modality: str, evictors, budgets):
    """``(evictor, budget)`` pairs of one modality: ``full`` once, every other evictor at every budget."""
    out = []
    for name in evictors:
        if name == "separator" and modality not in SEPARATOR_MODALITIES:
            continue
        if name == "full":
            out.append((name, None))
        else:
            out.extend((name, b) for b in budgets)
    return out


# -- language ------------------------------------------------------------------------------------------------
def run_language(evictors, budgets, size: dict, scorer, progress) -> list[Row]:
    from transformers import AutoModelForCausalLM

    from tokenmem.memory import TokenMemory

    from . import stdlib_lm_path
    from .lm_tasks import CodeCompletionTask, RetrievalTask

    path = stdlib_lm_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    per = max(1, size["retrieval"] // 4)  # balanced over the four distances
    tasks = {"code-completion": CodeCompletionTask(split="eval", limit=size["code-completion"], model_path=str(path)),
             "retrieval": RetrievalTask(split="eval", per_distance=per, model_path=str(path))}
    rows = []
    for name, budget in configs("language", evictors, budgets):
        def factory():
            return TokenMemory(model, _evictor(name, scorer), budget=budget)

        t0 = time.perf_counter()
        outputs = {t: task.run(model, factory) for t, task in tasks.items()}
        seconds = time.perf_counter() - t0
        flat = [o for outs in outputs.values() for o in outs]
        tokens = sum(int(o.input_ids.numel()) + (0 if o.generated is None else int(o.generated.numel())) for o in flat)
        busy = sum(o.extras["prefill_s"] + o.extras["decode_s"] for o in flat)
        metrics = {"code-completion ES": round(100 * tasks["code-completion"].score(outputs["code-completion"]), 1),
                   "retrieval EM": round(100 * tasks["retrieval"].score(outputs["retrieval"]), 1)}
        rows.append(Row("language", name, budget, round(statistics.mean(metrics.values()), 2), None,
                        round(statistics.mean(o.extras["held_fraction"] for o in flat), 4),
                        round(tokens / busy, 1), "tokens/s", round(seconds, 1), len(flat), metrics))
        progress(rows[-1])
    return rows


# -- video ---------------------------------------------------------------------------------------------------
def run_video(evictors, budgets, size: dict, scorer, progress, model_path=None,
              modality: str = "video") -> list[Row]:
    from . import video_lm_path, video_qwen2vl_path
    from . import video_task as task

    path = str(model_path or (video_qwen2vl_path() if modality == "video-qwen2vl" else video_lm_path()))
    frames = _video_frames(path)
    clips = task.clips("heldout", size["clips"], num_frames=frames)
    items = [(clip, kind) for clip in clips for kind in task.QUESTIONS]
    rows, shared = [], None
    for name, budget in configs(modality, evictors, budgets):
        qa = shared = video_qa(shared or path, _evictor(name, scorer), budget, frames)
        hits = {kind: [] for kind in task.QUESTIONS}
        held, on_events, event_share, per_frame = [], [], [], []
        t0 = time.perf_counter()
        for s in range(0, len(items), VIDEO_BATCH):
            part = items[s : s + VIDEO_BATCH]
            answers = qa.ask_many([c.frames for c, _ in part], [task.QUESTIONS[k] for _, k in part],
                                  max_new_tokens=6)
            held.append(answers[0].memory.stats()["held_fraction"])
            for (clip, kind), ans in zip(part, answers):
                hits[kind].append(ans.text.strip() == clip.answer(kind))
                on_events.append(event_token_share(ans.report, clip))
                event_share.append(len(ans.report.columns_of(clip.events)) / ans.report.frames)
                if clip is clips[0]:
                    per_frame.append(frame_fraction(ans.report, frames))  # [frames] share held, mean of layers
        seconds = time.perf_counter() - t0
        every = [h for v in hits.values() for h in v]
        metrics = {f"{kind} acc": round(100 * float(np.mean(v)), 1) for kind, v in hits.items()}
        details = {"event_token_share": round(float(np.mean(on_events)), 4),
                   "event_frame_share": round(float(np.mean(event_share)), 4),
                   "example_clip": {"seed": clips[0].seed, "events": list(clips[0].events),
                                    "event_kinds": {str(k): v for k, v in clips[0].event_kinds.items()},
                                    "frame_kept": np.mean(per_frame, axis=0).round(4).tolist()}}
        rows.append(Row(modality, name, budget, round(100 * float(np.mean(every)), 2),
                        round(100 * float(np.std(every)), 2), round(float(np.mean(held)), 4),
                        round(len(items) / seconds, 2), "questions/s", round(seconds, 1), len(items), metrics, details))
        progress(rows[-1])
    return rows


def video_qa(model, evictor, budget, frames: int):
    """A streaming :class:`VideoQA` or :class:`Qwen2VLVideoQA` (by the model's type; prompt fed in
    ``VIDEO_CHUNK``-token chunks) on a model directory, or on the model, tokenizer and preprocessor of an earlier
    one (loaded once for many evictors)."""
    from tokenmem.adapters.qwen2vl import video_qa as open_video_qa
    from tokenmem.adapters.video import VideoQA

    if isinstance(model, VideoQA):
        return type(model)(model.model, evictor, budget, tokenizer=model.tokenizer, preprocessor=model.preprocessor,
                           chat_template=model.chat_template, frames=frames, prefill_chunk=VIDEO_CHUNK)
    return open_video_qa(model, evictor, budget, frames=frames, prefill_chunk=VIDEO_CHUNK)


def event_token_share(report, clip) -> float:
    """Share of the held video tokens (all layers and KV heads) that lie on the clip's event frames (Qwen2-VL: on
    the temporal patches holding an event frame)."""
    kept = report.kept.sum(dim=(0, 1)).double()  # [columns]: held tokens of each frame (or temporal patch)
    return float(kept[report.columns_of(clip.events)].sum() / kept.sum().clamp_min(1))


def frame_fraction(report, frames: int) -> list[float]:
    """``[frames]``: share of each video frame's tokens held, mean over layers and KV heads (a Qwen2-VL temporal
    patch's share stands for both of its frames)."""
    per_column = report.fraction().mean(0)
    return per_column.repeat_interleave(report.frames_per_column)[:frames].tolist()


def _video_frames(path: str) -> int:
    import json
    from pathlib import Path

    card = Path(path) / "training.json"
    if card.exists():
        return int(json.loads(card.read_text())["spec"]["frames"])
    return 24


# -- rl ------------------------------------------------------------------------------------------------------
def run_rl(evictors, budgets, size: dict, scorer, progress, model_path=None, seed: int = 0) -> list[Row]:
    try:
        from tokenmem.envs import make_env, shipped_dt_path
    except ImportError as exc:
        raise TokenmemError(f"the rl modality needs gymnasium and MuJoCo ({exc}): pip install 'tokenmem[rl]'") from exc
    from tokenmem.adapters.decision import CachedPolicy, DecisionAdapter
    from tokenmem.envs.rollout import rollout
    from tokenmem.meta import MODALITY_NAMES

    adapter = DecisionAdapter.from_pretrained(str(model_path or shipped_dt_path()))
    rows = []
    for name, budget in configs("rl", evictors, budgets):
        scores, lengths, held, seconds = [], [], [], 0.0
        kinds = {"return": 0, "state": 0, "action": 0}
        for episode in range(size["episodes"]):  # one at a time: a batch would keep finished rows' tokens
            result = rollout(adapter, CachedPolicy(adapter, _evictor(name, scorer), budget),
                             [make_env(adapter.env_id)], [seed + episode], max_steps=size["max_steps"])
            scores.append(float(result.scores[0]))
            lengths.append(int(result.lengths[0]))
            seconds += result.seconds
            held.append(result.memory.stats()["held_fraction"])
            for layer in result.memory.layers:
                meta = layer.meta
                for code, count in zip(*torch.unique(meta.modality[meta.valid], return_counts=True)):
                    kind = MODALITY_NAMES[int(code)]
                    if kind in kinds:
                        kinds[kind] += int(count)
        total = max(1, sum(kinds.values()))
        details = {"kept_types": {k: round(v / total, 4) for k, v in kinds.items()},
                   "mean_length": round(float(np.mean(lengths)), 1)}
        rows.append(Row("rl", name, budget, round(float(np.mean(scores)), 2), round(float(np.std(scores)), 2),
                        round(float(np.mean(held)), 4), round(float(np.sum(lengths)) / seconds, 1), "steps/s",
                        round(seconds, 1), len(scores), {}, details))
        progress(rows[-1])
    return rows


# -- everything ----------------------------------------------------------------------------------------------
def run_video_qwen2vl(evictors, budgets, size: dict, scorer, progress, model_path=None) -> list[Row]:
    return run_video(evictors, budgets, size, scorer, progress, model_path, modality="video-qwen2vl")


RUNNERS = {"language": run_language, "video": run_video, "video-qwen2vl": run_video_qwen2vl, "rl": run_rl}


def __getattr__(name: str):
    if name == "EVICTORS":  # every registered evictor, full first (the registry, not a list kept here)
        return tuple(registered())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(modalities=MODALITIES, evictors=None, budgets=BUDGETS, size: str = "full", scorer="language",
        threads: int | None = None, log=print) -> dict:
    """Run the benchmark and return the report dict (rows + settings); see :mod:`tokenmem.zoo.transfer_report`."""
    from tokenmem.plugins.namm import NAMM

    bad = [m for m in modalities if m not in RUNNERS]
    if bad:
        raise TokenmemError(f"unknown modality {bad[0]!r}; choose from {', '.join(MODALITIES)}")
    evictors = registered() if evictors is None else check_evictors(evictors)
    if size not in SIZES:
        raise TokenmemError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    if any(not 0 < b < 1 for b in budgets):
        raise TokenmemError(f"budgets are fractions of the tokens seen in (0, 1), got {list(budgets)}")
    check_requirements(modalities)  # before any work: a missing package must not cost the modalities before it
    if threads:
        torch.set_num_threads(threads)
    namm = NAMM.load(scorer) if "namm" in evictors else None
    started = time.time()
    rows: list[Row] = []

    def progress(row: Row) -> None:
        budget = "all" if row.budget is None else f"{row.budget:.0%}"
        log(f"  {row.modality:<8} {row.evictor:<9} {budget:>4}  score {row.score:7.2f}  KV {row.kv_fraction:5.2f}  "
            f"{row.throughput:8.1f} {row.throughput_unit}  ({row.seconds:.0f} s)")

    seconds = {}
    for modality in modalities:
        log(f"{modality}: {len(configs(modality, evictors, budgets))} configurations ({size} size)")
        t0 = time.perf_counter()
        rows += RUNNERS[modality](evictors, budgets, SIZES[size], namm, progress)
        seconds[modality] = round(time.perf_counter() - t0, 1)
    return {"rows": [asdict(r) for r in rows], "size": size, "sizes": SIZES[size], "scorer": str(scorer),
            "scorer_digest": scorer_digest(namm) if namm is not None else None, "budgets": list(budgets),
            "evictors": list(evictors), "modalities": list(modalities),
            "seconds": seconds, "total_seconds": round(time.time() - started, 1),
            "machine": {"cpus": _cpus(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": _version("transformers")},
            "date": time.strftime("%Y-%m-%d")}


def check_requirements(modalities) -> None:
    """Raise a :class:`TokenmemError` naming what to install when a requested modality cannot run here."""
    if "rl" in modalities:
        import importlib

        try:  # what make_env imports: gymnasium's MuJoCo environments (mujoco, imageio, ...)
            importlib.import_module("gymnasium.envs.mujoco")
        except ImportError as exc:
            raise TokenmemError(f"the rl modality needs gymnasium's MuJoCo environments, which do not import here "
                                f"({exc}): pip install 'tokenmem[rl]' (or leave rl out: --modalities language "
                                "video)") from exc


def merge_reports(reports: list[dict]) -> dict:
    """One report from several runs of different modalities (e.g. run side by side as separate processes):
    rows and per-modality seconds are joined; settings (size, evictors, budgets, scorer) must agree."""
    if not reports:
        raise TokenmemError("no reports to merge")
    first = reports[0]
    for key in ("size", "scorer", "scorer_digest", "budgets"):
        values = {json.dumps(r.get(key)) for r in reports}
        if len(values) > 1:
            raise TokenmemError(f"cannot merge transfer reports with different {key}: {sorted(values)}")
    modalities = [m for r in reports for m in r["modalities"]]
    if len(set(modalities)) != len(modalities):
        raise TokenmemError(f"the reports repeat a modality ({modalities}); merge runs of different modalities")
    merged = dict(first)
    order = sorted(modalities, key=lambda m: MODALITIES.index(m) if m in MODALITIES else len(MODALITIES))
    rows = [row for r in reports for row in r["rows"]]
    merged["rows"] = sorted(rows, key=lambda row: order.index(row["modality"]))  # stable: each run's order kept
    merged["modalities"] = order
    merged["evictors"] = list(dict.fromkeys(e for r in reports for e in r["evictors"]))
    merged["seconds"] = {m: v for r in reports for m, v in r["seconds"].items()}
    merged["total_seconds"] = round(sum(r["total_seconds"] for r in reports), 1)
    merged["date"] = max(r["date"] for r in reports)
    return merged


def scorer_digest(namm) -> str:
    """A short fingerprint of a NAMM scorer's contents (config, parameters, normalisation): two reports that both
    name the scorer ``language`` may still hold different versions of it."""
    import hashlib

    h = hashlib.sha256(json.dumps(namm.config.to_dict(), sort_keys=True).encode())
    for t in (namm.params, namm.norm_mean, namm.norm_var):
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def update_report(base: dict, update: dict) -> dict:
    """``base`` with the rows of ``update`` in place of its rows of the same (modality, evictor, budget): re-run one
    evictor (``tokenmem bench --evictors namm ...``) without re-running the others. ``update``'s modalities must be
    among ``base``'s, with the same size and budgets. When ``update`` has NAMM rows of a scorer whose digest is not
    the base's (or the base has none), it must re-run every NAMM row of ``base``, so no report mixes scorers.
    The update is recorded in ``updates`` (its command, date, evictors and seconds) and named in the report."""
    for key in ("size", "budgets"):
        if json.dumps(base.get(key)) != json.dumps(update.get(key)):
            raise TokenmemError(f"cannot update a transfer report with a run of different {key}: "
                                f"{base.get(key)} vs {update.get(key)}; re-run with the base report's settings")
    extra = [m for m in update["modalities"] if m not in base["modalities"]]
    if extra:
        raise TokenmemError(f"the update runs modalities the base report lacks ({extra}); merge separate modality "
                            "runs with --from-json alone")
    key = lambda row: (row["modality"], row["evictor"], row["budget"])  # noqa: E731
    new = {key(r): r for r in update["rows"]}
    reruns_namm = any(r["evictor"] == "namm" for r in update["rows"])
    same_scorer = base.get("scorer_digest") is not None and update.get("scorer_digest") == base.get("scorer_digest")
    if reruns_namm and not same_scorer:
        stale = [k for k in map(key, base["rows"]) if k[1] == "namm" and k not in new]
        if stale:
            raise TokenmemError(f"the update's NAMM scorer ({update.get('scorer')}, {update.get('scorer_digest')}) is "
                                f"not the base report's ({base.get('scorer')}, {base.get('scorer_digest')}), but it "
                                f"leaves {len(stale)} NAMM rows of the old scorer (e.g. {stale[0]}); re-run namm on "
                                "every modality and budget of the base report")
    seen = {key(r) for r in base["rows"]}
    rows = [new.get(key(r), r) for r in base["rows"]]
    rows += [r for r in update["rows"] if key(r) not in seen]  # rows the base lacked (e.g. a new evictor)
    merged = dict(base, rows=sorted(rows, key=lambda row: base["modalities"].index(row["modality"])))
    if reruns_namm:
        merged["scorer"], merged["scorer_digest"] = update.get("scorer"), update.get("scorer_digest")
    merged["evictors"] = list(dict.fromkeys([*base["evictors"], *update["evictors"]]))
    merged["updates"] = [*base.get("updates", []), *update.get("updates", []),
                         {"command": update.get("command"), "date": update["date"], "evictors": update["evictors"],
                          "modalities": update["modalities"], "seconds": update["seconds"],
                          "machine": update.get("machine")}]
    return merged  # "date" and "machine" stay the base run's: each update names its own


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# -- command line --------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="size",
                      help=f"fewer items ({SIZES['quick']}; <= 10 min on 2 cores)")
    size.add_argument("--smoke", action="store_const", const="smoke", dest="size",
                      help=f"a handful of items ({SIZES['smoke']}; the CI smoke test)")
    p.set_defaults(size="full")
    p.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    add_evictors_argument(p)
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="fractions of the tokens seen")
    p.add_argument("--scorer", default="language",
                   help="NAMM scorer: a shipped name (default: language, unchanged on every modality), 'initial' or a path")
    p.add_argument("--out", default="tokenmem-bench", help="directory for transfer.json / transfer.md / PNG plots")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these models are small, and a second OpenMP thread stalls "
                        "whenever another process takes its core)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--readme", default=None, help="also rewrite the transfer section of this README")
    p.add_argument("--from-json", nargs="+", default=None, metavar="PATH",
                   help="run nothing: rewrite the report, plots (and --readme) from an earlier transfer.json (several: "
                        "runs of different modalities, merged)")
    p.add_argument("--update-from", nargs="+", default=None, metavar="PATH",
                   help="with --from-json: the transfer.json of later runs of some evictors (e.g. --evictors namm "
                        "after a new scorer) whose rows replace the same rows of the --from-json report")


def main_from_args(args, command: str) -> int:
    from pathlib import Path

    from .transfer_report import check_readme, markdown, write

    if args.readme:
        check_readme(Path(args.readme))  # before any work
    if args.from_json:
        import json

        reports = []
        for source in map(Path, args.from_json):
            if not source.is_file():
                raise TokenmemError(f"--from-json {source}: no such file; give the transfer.json of an earlier run")
            reports.append(json.loads(source.read_text(encoding="utf-8")))
        report = merge_reports(reports)
        command = report.get("command") or command
        for source in map(Path, args.update_from or []):
            if not source.is_file():
                raise TokenmemError(f"--update-from {source}: no such file; give the transfer.json of a later run")
            report = update_report(report, json.loads(source.read_text(encoding="utf-8")))
    elif args.update_from:
        raise TokenmemError("--update-from needs --from-json: the report whose rows it replaces")
    else:
        report = run(args.modalities, args.evictors, args.budgets, args.size, args.scorer, args.threads)
    files = write(report, Path(args.out), command=command, make_plots=not args.no_plots,
                  readme=Path(args.readme) if args.readme else None)
    print()
    print(markdown(report, command))
    print("wrote " + ", ".join(str(p) for v in files.values() for p in (v if isinstance(v, list) else [v])))
    return 0


def main(argv=None) -> int:
    """``python benchmarks/transfer.py`` / ``tokenmem bench`` (the same options)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return main_from_args(args, "tokenmem bench " + " ".join(sys.argv[1:] if argv is None else argv))
