"""The transfer benchmark's outputs: a markdown report (tables, the claims checked on the rows), PNG plots, and the
README's Results section regenerated from the same numbers (see :mod:`tokenmem.zoo.transfer`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TokenmemError

BASELINES = ("recent", "sink", "h2o")
UNITS = {"language": "mean of code-completion ES and retrieval EM (x100)",
         "video": "accuracy (%, chance 25; LLaVA-NeXT-Video)", "video-qwen2vl": "accuracy (%, chance 25; Qwen2-VL)",
         "rl": "D4RL-normalised score (Hopper)"}
VIDEO_MODALITIES = ("video", "video-qwen2vl")
VIDEO_PLOTS = {"video": "transfer_video_frames.png", "video-qwen2vl": "transfer_video_qwen2vl_frames.png"}
COLOURS = {"full": "black", "recent": "tab:orange", "sink": "tab:green", "separator": "tab:brown", "h2o": "tab:red",
           "namm": "tab:purple"}  # one colour per evictor in every panel
README_BEGIN, README_END = "<!-- transfer:begin -->", "<!-- transfer:end -->"


def _budget(b) -> str:
    return "all" if b is None else f"{b:.0%}"


def _rows(report: dict, modality: str) -> list[dict]:
    return [r for r in report["rows"] if r["modality"] == modality]


def _find(rows, evictor, budget):
    return next((r for r in rows if r["evictor"] == evictor and r["budget"] == budget), None)


def table(report: dict, modality: str) -> str:
    rows = _rows(report, modality)
    full = _find(rows, "full", None)
    metric_names = list(rows[0]["metrics"]) if rows else []
    head = ["evictor", "budget", "KV held", "score", "vs full"] + metric_names
    if modality in VIDEO_MODALITIES:
        head += ["kept on event frames"]
    if modality == "rl":
        head += ["held return/state/action"]
    head += ["throughput"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        score = f"{r['score']:.1f}" + (f" ± {r['score_std']:.1f}" if modality == "rl" else "")
        rel = f"{r['score'] / full['score']:.2f}" if full and full["score"] else "–"
        cells = [r["evictor"], _budget(r["budget"]), f"{r['kv_fraction']:.2f}", score, rel]
        cells += [f"{r['metrics'][m]:.1f}" for m in metric_names]
        if modality in VIDEO_MODALITIES:
            cells.append(f"{r['details']['event_token_share']:.0%} (video: {r['details']['event_frame_share']:.0%})")
        if modality == "rl":
            k = r["details"]["kept_types"]
            cells.append(f"{k['return']:.0%}/{k['state']:.0%}/{k['action']:.0%}")
        cells.append(f"{r['throughput']:.1f} {r['throughput_unit']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(report: dict) -> list[str]:
    """The paper's claims in miniature, checked on the rows: per modality and budget, does the language-trained NAMM
    beat recent / sink / h2o at equal KV, and does it stay within 2% of the full cache; for video, does it (and every
    other evictor) keep event frames above their share of the video."""
    out = []
    for modality in report["modalities"]:
        rows = _rows(report, modality)
        full = _find(rows, "full", None)
        for budget in report["budgets"]:
            namm = _find(rows, "namm", budget)
            if namm is None:
                continue
            parts = []
            for name in BASELINES:
                other = _find(rows, name, budget)
                if other is None:
                    continue
                verdict = "beats" if namm["score"] > other["score"] else "ties" if namm["score"] == other["score"] \
                    else "loses to"
                noise = " (within noise)" if verdict != "ties" and _within_noise(namm, other) else ""
                parts.append(f"{verdict} {name}{noise} ({namm['score']:.1f} vs {other['score']:.1f}, KV "
                             f"{namm['kv_fraction']:.2f} vs {other['kv_fraction']:.2f})")
            line = f"- **{modality}, {budget:.0%}**: NAMM " + "; ".join(parts)
            if full is not None and full["score"]:
                gap = 1 - namm["score"] / full["score"]
                within = "within" if gap <= 0.02 else "not within"
                side = f"{gap:.1%} below" if gap >= 0 else f"{-gap:.1%} above"
                line += f"; {within} 2% of full ({namm['score']:.1f} vs {full['score']:.1f}, {side})"
            out.append(line + ".")
        if modality in VIDEO_MODALITIES:
            for r in rows:
                if r["budget"] is None:
                    continue
                d = r["details"]
                first = "keeps event frames first" if d["event_token_share"] > d["event_frame_share"] else \
                    "does not favour event frames"
                out.append(f"- {modality}, {r['evictor']} at {r['budget']:.0%}: {d['event_token_share']:.0%} of the "
                           f"held video tokens are on event frames, which are {d['event_frame_share']:.0%} of the "
                           f"video: {first}.")
    return out


def _within_noise(a: dict, b: dict) -> bool:
    """|difference| below two standard errors of it (rows with a spread over items: video questions, rl seeds)."""
    if a.get("score_std") is None or b.get("score_std") is None:
        return False
    se = (a["score_std"] ** 2 / max(1, a["items"]) + b["score_std"] ** 2 / max(1, b["items"])) ** 0.5
    return abs(a["score"] - b["score"]) < 2 * se


def _digest(report: dict) -> str:
    return f" (digest {report['scorer_digest']})" if report.get("scorer_digest") else ""


def markdown(report: dict, command: str | None = None) -> str:
    m = report["machine"]
    lines = [f"Measured {report['date']} on {m['cpus']} CPU cores ({m['threads']} torch threads, {m['platform']}; "
             f"torch {m['torch']}, transformers {m['transformers']}), size `{report['size']}` "
             f"({', '.join(f'{k} {v}' for k, v in report['sizes'].items())}); "
             f"NAMM scorer `{report['scorer']}`{_digest(report)} "
             f"(evolved on language), unchanged on every modality. Budgets are fractions of the tokens seen. "
             f"Run time: {report['total_seconds'] / 60:.1f} min "
             f"({', '.join(f'{k} {v / 60:.1f}' for k, v in report['seconds'].items())})."]
    if command:
        lines += ["", f"Regenerate: `{command}`"]
    for u in report.get("updates", []):
        lines += ["", f"Then the rows of {', '.join(u['evictors'])} on {', '.join(u['modalities'])} "
                      f"re-run on {u['date']} "
                      f"({sum(u['seconds'].values()) / 60:.1f} min): `{u['command']}`, put in place of the rows above "
                      f"with `tokenmem bench --from-json <this report's transfer.json> --update-from <its "
                      f"transfer.json>`."]
    for modality in report["modalities"]:
        lines += ["", f"**{modality}** — score: {UNITS[modality]}", "", table(report, modality)]
    found = claims(report)
    if found:
        lines += ["", "Claims checked on these rows:", ""] + found
    return "\n".join(lines) + "\n"


def check_readme(readme: Path) -> str:
    """The text of ``readme`` (``--readme``), refused unless it is a file holding both transfer markers; run before any
    benchmark work, so that an hour's run does not end on a missing or unmarked README."""
    import os

    if not readme.is_file():
        raise TokenmemError(f"--readme {readme}: no such file; give the README whose transfer section to rewrite")
    if not os.access(readme, os.W_OK):
        raise TokenmemError(f"--readme {readme} is not writable; make it writable or leave out --readme")
    try:
        text = readme.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TokenmemError(f"--readme {readme} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    begin = text.find(README_BEGIN)
    if begin < 0 or text.find(README_END, begin) < 0:
        raise TokenmemError(f"{readme} has no {README_BEGIN} ... {README_END} markers (begin before end); add them "
                            "where the transfer results belong")
    return text


def update_readme(readme: Path, section: str) -> None:
    """Replace the text between the transfer markers of ``readme`` with ``section``."""
    text = check_readme(readme)
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + section + README_END + tail, encoding="utf-8")


# -- plots ---------------------------------------------------------------------------------------------------
def plots(report: dict, out_dir: Path) -> list[Path]:
    """PNG files: score vs KV per modality; the video frame-retention heat map; the RL token types held."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise TokenmemError(f"plots need matplotlib ({exc}): pip install matplotlib, or pass --no-plots") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    mods = report["modalities"]
    fig, axes = plt.subplots(1, len(mods), figsize=(5 * len(mods), 4), squeeze=False)
    for ax, modality in zip(axes[0], mods):
        rows = _rows(report, modality)
        for name in dict.fromkeys(r["evictor"] for r in rows):
            mine = sorted((r for r in rows if r["evictor"] == name), key=lambda r: r["kv_fraction"])
            style = dict(marker="*", markersize=12) if name == "namm" else dict(marker="o")
            ax.plot([r["kv_fraction"] for r in mine], [r["score"] for r in mine], label=name,
                    color=COLOURS.get(name), **style)
        ax.set_title(modality)
        ax.set_xlabel("KV fraction held")
        ax.set_ylabel(UNITS[modality], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Score vs KV held; NAMM = the language-trained scorer, unchanged")
    fig.tight_layout()
    made.append(out_dir / "transfer_score_vs_kv.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    for modality, name in VIDEO_PLOTS.items():
        video = [r for r in _rows(report, modality) if r["budget"] is not None]
        if video:
            made.append(_video_plot(plt, video, out_dir / name, modality))
    rl = _rows(report, "rl")
    if rl:
        made.append(_rl_plot(plt, rl, out_dir / "transfer_rl_kept.png"))
    return made


def _video_plot(plt, rows, path: Path, modality: str = "video") -> Path:
    import numpy as np

    example = rows[0]["details"]["example_clip"]
    heat = np.array([r["details"]["example_clip"]["frame_kept"] for r in rows])  # [configs, frames]
    labels = [f"{r['evictor']} {r['budget']:.0%}" for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 0.45 * len(rows) + 2), gridspec_kw={"width_ratios": [3, 1.4]})
    im = ax.imshow(heat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    kinds = {int(k): v for k, v in example["event_kinds"].items()}
    ax.set_xticks(range(heat.shape[1]), [f"{t}\n{kinds[t][:3]}" if t in kinds else str(t) for t in range(heat.shape[1])],
                  fontsize=7)
    for t in kinds:
        ax.axvline(t, color="red", alpha=0.35, linewidth=6)
    ax.set_xlabel("frame (event frames shaded red: app(ear) / rec(olour) / mov(e) / fla(sh))")
    model = "Qwen2-VL; a temporal patch of 2 frames" if modality == "video-qwen2vl" else "LLaVA-NeXT-Video"
    ax.set_title(f"{model}: share of each frame's tokens held after the prompt\nheld-out clip seed {example['seed']} "
                 "(mean over layers and KV heads)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.025)
    share = [r["details"]["event_token_share"] for r in rows]
    bx.barh(range(len(rows)), share, color=["tab:orange" if r["evictor"] == "namm" else "tab:blue" for r in rows])
    bx.axvline(rows[0]["details"]["event_frame_share"], color="red", linestyle="--", label="event frames' share of video")
    bx.set_yticks(range(len(rows)), labels, fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("share of held video tokens on event frames")
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rl_plot(plt, rows, path: Path) -> Path:
    labels = [f"{r['evictor']} {_budget(r['budget'])}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.0 * len(rows) + 2, 4))
    bottom = [0.0] * len(rows)
    for kind, colour in (("return", "tab:green"), ("state", "tab:blue"), ("action", "tab:orange")):
        values = [r["details"]["kept_types"][kind] for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, label=kind, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("share of held tokens (end of episode)")
    ax.set_title("Hopper Decision Transformer: token types each memory holds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: dict, out_dir: Path, *, command: str | None = None, make_plots: bool = True,
          readme: Path | None = None) -> dict:
    """``transfer.json``, ``transfer.md`` and the plots in ``out_dir``; optionally the README section. ``command``
    (what made the numbers) is kept in the JSON, so that a report rewritten from it names the original run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = report.setdefault("command", command)
    (out_dir / "transfer.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    text = markdown(report, command)
    (out_dir / "transfer.md").write_text(text, encoding="utf-8")
    files = {"json": out_dir / "transfer.json", "markdown": out_dir / "transfer.md"}
    if make_plots:
        files["plots"] = plots(report, out_dir)
    if readme is not None:
        figures = "".join(f"\n![{p.stem}]({p.relative_to(readme.parent) if p.is_relative_to(readme.parent) else p})\n"
                          for p in files.get("plots", []))
        update_readme(readme, text + figures)
    return files
