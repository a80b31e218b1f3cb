"""Why the language-trained NAMM scorer drops the first frames of a video (issue #16, item 5).

An analysis, not a library change. The shipped scorer (``NAMM.pretrained("language")``) is used unchanged, except in
the rescoring (table 8) and the controlled check (table 9), where this script edits one group of its input features.

1. **Traces.** Held-out clips are streamed the way ``tokenmem bench`` streams them (``VideoQA``, 32-token prefill
   chunks, a budget of 25% of the tokens seen, eviction after every chunk) through the shipped video model, once
   with NAMM and once with h2o. At every eviction the script records each held token: its kind (the text before
   the video, a frame token, or the question), frame, age, the 25 features (recency embedding plus the raw and the
   normalised EMA spectrogram), the score, the attention it has received, and whether it was kept. The same is done
   for the eval code-completion prompts cut to the video prompt's length, on the shipped stdlib Llama with the
   same chunks and budget, and for the full-length prompts in 128-token chunks, the setting the scorer was evolved
   and calibrated in.
2. **Features.** Tables 1-3: the range of the normalised EMA features against the language calibration; the
   features and score by token age; how much attention a key gets from queries 0-240 tokens later (full cache).
3. **Keep decisions.** Tables 4-6: the chance a held token is kept at one eviction, by age; how a cohort of early
   tokens thins out update by update; what is held of each frame when the prompt ends.
4. **Score drivers.** Tables 7-8: linear fits of the score on feature groups, and the recorded updates rescored
   with the EMA features replaced by the mean of *language* tokens of the same age ("language profile").
5. **Controlled check.** Table 9: accuracy, and what is held of the first frames, with the recency features frozen
   or the EMA features replaced (all bins, the level bins 0-1 only, or the texture bins 2-16 only), next to h2o and
   recent.

    python benchmarks/namm_video_analysis.py --clips 8      # about a minute with one thread
    python benchmarks/namm_video_analysis.py --clips 24 --json out.json     # about 2.5 minutes (the results file)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from tokenmem.compat import cache_kwargs
from tokenmem.memory import TokenMemory
from tokenmem.meta import MODALITIES, PROTECT
from tokenmem.plugins.h2o import H2OEvictor
from tokenmem.plugins.namm import NAMM
from tokenmem.plugins.namm.features import recency_features
from tokenmem.plugins.namm.scorer import bam_scores, unflatten

BUDGET = 0.25
CHUNK = 32  # tokenmem bench's VIDEO_CHUNK
AGE_BUCKETS = ((0, 32), (32, 64), (64, 128), (128, 192), (192, 100_000))
KINDS = ("sink", "frame", "question", "text")  # sink: the text before the video; text: a language prompt
MAX_AGE = 256  # length of the language age profile


def bucket_name(lo, hi):
    return f"{lo}-{hi - 1}" if hi < 100_000 else f">={lo}"


AGE_HEADER = [bucket_name(*b) for b in AGE_BUCKETS]


# ---------------------------------------------------------------------------------------------------------------
# Probes: the shipped evictors plus a recorder
# ---------------------------------------------------------------------------------------------------------------
class ProbeNAMM(NAMM):
    """The shipped scorer, recording every update when ``record``; ``variant`` edits one feature group (an
    experiment in this script only, never shipped):

    - ``shipped``: unchanged (the same scores as ``NAMM.pretrained("language")``);
    - ``recency-const``: every token gets the recency features of age ``const_age``, so the score ignores age;
    - ``recency-fast``: only the fastest recency pair, sin/cos of the age in radians (period 2 pi tokens), is frozen
      at age ``const_age``;
    - ``ema-zero``: the normalised EMA features are 0 (the language mean) for every token, so the score sees age only;
    - ``ema-profile``: the normalised EMA bins ``bins`` are replaced by the mean over *language* tokens of the same
      age (``profile [ages, 17]``, from the language trace): a language token's attention, the real token's age;
    - ``full-observer``: with ``threshold=None`` and budget 1.0 nothing is evicted; it records attention by distance.
    """

    def __init__(self, base: NAMM, variant: str = "shipped", record: bool = False, const_age: int = 0,
                 profile: torch.Tensor | None = None, bins=None):
        super().__init__(base.config, base.params, base.norm_mean, base.norm_var)
        self.variant, self.record, self.const_age = variant, record, const_age
        self.profile = profile
        self.bins = torch.arange(base.config.bins) if bins is None else torch.as_tensor(bins)
        if variant == "full-observer":
            self.threshold = None  # the memory's budget path: with budget 1.0 it never evicts
        self.log: list[dict] = []
        self.attention: dict = {}  # (key kind, distance bucket) -> [sum of attention x visible keys, pairs]
        self.reset()

    def reset(self):
        self._folded, self._last_seen = {}, {}

    def state_spec(self):
        spec = super().state_spec()
        spec["probe_mass"] = ((), torch.float32)  # attention received, undecayed sum (what h2o ranks by)
        spec["probe_chunk"] = ((), torch.float32)  # attention received since the previous update
        return spec

    def observe(self, view):
        rows, hop = view.rows, self.config.hop
        if rows is not None and rows.shape[2] >= hop:
            done = rows.shape[2] // hop * hop  # what NAMM folds now (the rest waits, as in NAMM.observe)
            part = rows[:, :, :done]  # [b, h, done, n]
            got = part.sum(2)
            view.state["probe_mass"].add_(got)
            view.state["probe_chunk"].add_(got)
            q0 = self._folded.get(view.layer, 0)
            self._folded[view.layer] = q0 + done
            if self.variant == "full-observer":
                self._attention_by_distance(view, part, q0)
        super().observe(view)

    def _attention_by_distance(self, view, part, q0):
        """Attention per (query, key) pair, times the number of keys the query sees (1 = a uniform share), by
        query-key distance and key kind; batch row 0, every KV head, nothing evicted."""
        meta = view.meta
        pos = meta.position[0]  # [h, n]
        queries = torch.arange(q0, q0 + part.shape[2])  # stream indices of the rows
        dist = queries[None, :, None] - pos[:, None, :]  # [h, done, n]
        visible = (dist >= 0) & meta.valid[0][:, None, :]
        share = part[0].detach() * (queries[None, :, None] + 1).float()  # x keys visible (position + 1)
        kinds = token_kinds(meta)[0]  # [h, n]
        for kind in set(kinds.flatten().tolist()):
            for lo, hi in AGE_BUCKETS:
                sel = visible & (dist >= lo) & (dist < hi) & (kinds[:, None, :] == kind)
                if bool(sel.any()):
                    acc = self.attention.setdefault((KINDS[kind], bucket_name(lo, hi)), [0.0, 0])
                    acc[0] += float(share[sel].sum())
                    acc[1] += int(sel.sum())

    def features(self, view):
        cfg = self.config
        pos = view.meta.position
        age = pos.amax(dim=-1, keepdim=True) - pos
        x = super().features(view)  # [recency | normalised EMA | key feature (v3)]: the variants edit the first two
        split = cfg.recency_dim + cfg.bins
        rec, z, rest = x[..., : cfg.recency_dim], x[..., cfg.recency_dim : split], x[..., split:]
        if self.variant == "recency-const":
            rec = recency_features(torch.full_like(age, self.const_age), cfg)
        elif self.variant == "recency-fast":
            frozen = recency_features(torch.full_like(age, self.const_age), cfg)
            half = cfg.recency_dim // 2
            rec = rec.clone()
            rec[..., 0], rec[..., half] = frozen[..., 0], frozen[..., half]
        if self.variant == "ema-zero":
            z = torch.zeros_like(z)
        elif self.variant == "ema-profile":
            z = z.clone()
            z[..., self.bins] = self.profile[age.clamp(max=self.profile.shape[0] - 1)][..., self.bins]
        return torch.cat([rec, z, rest], dim=-1)

    def score(self, view):
        x = self.features(view)
        b, h, n, f = x.shape
        params = unflatten(self.params, self.config)
        scores = bam_scores(x.reshape(b * h, n, f), view.meta.valid.reshape(b * h, n), params).view(b, h, n)
        if self.record:
            since = view.seen - self._last_seen.get(view.layer, 0)
            self._last_seen[view.layer] = view.seen
            self.log.append(snapshot(view, scores, x=x, ema=view.state["namm_ema"], mass=view.state["probe_mass"],
                                     chunk=view.state["probe_chunk"], since=torch.full_like(scores, since)))
        view.state["probe_chunk"].zero_()
        return scores


class ProbeH2O(H2OEvictor):
    """h2o (a recent half plus heavy hitters by accumulated attention), recording its updates."""

    def __init__(self):
        super().__init__()
        self.log: list[dict] = []

    def reset(self):
        pass

    def score(self, view):
        scores = super().score(view)
        self.log.append(snapshot(view, scores, mass=view.state["h2o_mass"]))
        return scores


def token_kinds(meta) -> torch.Tensor:
    """Index into KINDS of every token: frame tokens, text before the first frame (sink), text after it (question);
    ``text`` when there are no frames."""
    frame = meta.modality == MODALITIES["frame"]
    pos = meta.position
    if not bool(frame.any()):
        return torch.full_like(pos, KINDS.index("text"))
    first = torch.where(frame, pos, torch.full_like(pos, 1 << 40)).amin(-1, keepdim=True)
    text_kind = torch.where(pos < first, KINDS.index("sink"), KINDS.index("question"))
    return torch.where(frame, KINDS.index("frame"), text_kind)


def snapshot(view, scores, **tensors) -> dict:
    """Batch row 0 of one update, every KV head, valid tokens only (flat ``[tokens]`` arrays)."""
    meta = view.meta
    valid = meta.valid[0]  # [h, n]
    heads = torch.arange(valid.shape[0])[:, None].expand_as(valid)
    pos = meta.position[0]
    out = {"layer": view.layer, "seen": view.seen, "budget": view.budget,
           "head": heads[valid].numpy(), "pos": pos[valid].numpy(),
           "age": (pos.amax(-1, keepdim=True) - pos)[valid].numpy(),
           "kind": token_kinds(meta)[0][valid].numpy(), "frame": meta.segment[0][valid].numpy(),
           "protected": ((meta.flags[0] & PROTECT) != 0)[valid].numpy(),
           "held": valid.sum(-1, keepdim=True).expand_as(valid)[valid].numpy(),
           "score": scores[0][valid].detach().float().numpy()}
    for name, t in tensors.items():
        out[name] = t[0][valid].detach().float().numpy()
    return out


def hook_kept(memory: TokenMemory, log: list[dict]) -> None:
    """After each eviction, mark which tokens of that layer's last record stayed."""
    evict = memory.evict_layer

    def wrapped(layer, keep):
        evict(layer, keep)
        rec = next(r for r in reversed(log) if r["layer"] == layer.index and "kept" not in r)
        meta = layer.meta
        held = set()
        for h in range(meta.position.shape[1]):
            held.update((h, int(p)) for p in meta.position[0, h][meta.valid[0, h]].tolist())
        rec["kept"] = np.array([(int(h), int(p)) in held for h, p in zip(rec["head"], rec["pos"])])

    memory.evict_layer = wrapped


def held_positions(memory: TokenMemory):
    """``[(layer, head, positions held)]`` of batch row 0."""
    return [(layer.index, h, layer.meta.position[0, h][layer.meta.valid[0, h]].numpy())
            for layer in memory.layers for h in range(layer.meta.position.shape[1])]


# ---------------------------------------------------------------------------------------------------------------
# Streaming (video and language)
# ---------------------------------------------------------------------------------------------------------------
def _start(evictor, memory):
    evictor.reset()
    log = getattr(evictor, "log", None)
    if log is not None:
        hook_kept(memory, log)
    return len(log) if log is not None else 0


def stream_video(qa, evictor, clips, budget=BUDGET, question="colour"):
    """Prefill each clip's prompt as ``tokenmem bench`` does (``qa`` streams in 32-token chunks)."""
    from tokenmem.zoo import video_task

    out = []
    for clip in clips:
        memory = TokenMemory(qa.model.get_decoder(), evictor, budget, separator_ids=qa.separators)
        start = _start(evictor, memory)
        inputs = qa.encode([qa.load(clip.frames)], [video_task.QUESTIONS[question]])
        qa._prefill(inputs, memory)
        out.append({"records": list(getattr(evictor, "log", [])[start:]), "held": held_positions(memory),
                    "meta": inputs.meta, "clip": clip})
    return out


def stream_language(model, evictor, prompts, chunk, budget=BUDGET):
    out = []
    for ids in prompts:
        memory = TokenMemory(model, evictor, budget)
        start = _start(evictor, memory)
        with torch.no_grad():
            for s in range(0, ids.shape[0], chunk):
                model(input_ids=ids[None, s : s + chunk], **cache_kwargs(model, memory), use_cache=True,
                      logits_to_keep=1)
        out.append({"records": list(getattr(evictor, "log", [])[start:]), "held": held_positions(memory)})
    return out


def flat(runs) -> dict:
    """All records of several runs as one table of arrays (one row per token and update)."""
    cols: dict[str, list] = {}
    for r, run in enumerate(runs):
        for u, rec in enumerate(run["records"]):
            n = len(rec["pos"])
            extra = {"run": np.full(n, r), "update": np.full(n, u), "layer": np.full(n, rec["layer"]),
                     "seen": np.full(n, rec["seen"]), "budget": np.full(n, rec["budget"])}
            for name, value in {**rec, **extra}.items():
                if isinstance(value, np.ndarray):
                    cols.setdefault(name, []).append(value)
    return {k: np.concatenate(v) for k, v in cols.items()}


def language_profile(t) -> torch.Tensor:
    """``[MAX_AGE, 17]``: the mean normalised EMA of language tokens of each age (+-4 tokens)."""
    prof = torch.zeros(MAX_AGE, t["x"].shape[1] - 8)
    for a in range(MAX_AGE):
        sel = (t["age"] >= a - 4) & (t["age"] <= a + 4)
        prof[a] = torch.from_numpy(t["x"][sel][:, 8:].mean(0)) if sel.any() else prof[a - 1]
    return prof


# ---------------------------------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------------------------------
def table(title, header, rows):
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def pct(x, digits=0):
    return f"{100 * x:.{digits}f}%" if x == x else "-"


def f2(x):
    return f"{x:.2f}" if x == x else "-"


def f3(x):
    return f"{x:.3f}" if x == x else "-"


def mean(x):
    return float(np.mean(x)) if len(x) else float("nan")


def by_age(t, sel, fn):
    return [fn(sel & (t["age"] >= lo) & (t["age"] < hi)) for lo, hi in AGE_BUCKETS]


def keep_by_age(t, sel):
    """P(kept | held and unprotected at an eviction), by age bucket."""
    return by_age(t, sel & ~t["protected"], lambda s: mean(t["kept"][s]))


def cohort(runs, lo, hi):
    """Share of the tokens at positions lo..hi-1 still held after each update (mean over layers, heads, runs)."""
    acc: dict[int, list] = {}
    for run in runs:
        for rec in run["records"]:
            heads = len(np.unique(rec["head"]))
            sel = (rec["pos"] >= lo) & (rec["pos"] < hi)
            acc.setdefault(rec["seen"], []).append(rec["kept"][sel].sum() / ((hi - lo) * heads))
    return {seen: mean(v) for seen, v in sorted(acc.items())}


def frame_held(runs, frames=24, tokens=9):
    """``[frames]``: share of each frame's tokens held when the prompt ends (mean over layers, heads, clips)."""
    acc, count = np.zeros(frames), 0
    for run in runs:
        seg = run["meta"].segment[0].numpy()
        for _, _, held in run["held"]:
            acc += np.bincount(seg[held][seg[held] >= 0], minlength=frames)[:frames] / tokens
            count += 1
    return acc / count


def frame_share(t, sel, values) -> float:
    """Share of the variance of ``values`` among the frame tokens held at one update (run, layer, update, head)
    that lies between frames rather than within a frame."""
    g1 = np.unique(np.stack([t["run"], t["update"], t["head"]], 1)[sel], axis=0, return_inverse=True)[1].ravel()
    g2 = np.unique(np.stack([t["run"], t["update"], t["head"], t["frame"]], 1)[sel], axis=0,
                   return_inverse=True)[1].ravel()
    v = values[sel].astype(np.float64)

    def within(g):
        m = np.bincount(g, v) / np.bincount(g)
        return float(((v - m[g]) ** 2).mean())

    return 1 - within(g2) / within(g1)


def linear_r2(t, cols):
    X = np.concatenate([t["x"][:, cols].astype(np.float64), np.ones((len(t["x"]), 1))], axis=1)
    y = t["score"].astype(np.float64)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    return 1 - (y - X @ beta).var() / y.var()


def score_period(t):
    """Period (tokens) of the mean score as a function of age 0..127: the strongest peak of its spectrum."""
    m = np.nan_to_num(np.array([mean(t["score"][t["age"] == a]) for a in range(128)]))
    spec = np.abs(np.fft.rfft(m - m.mean()))
    k = int(np.argmax(spec[2:])) + 2  # past the slow trend
    return 128 / k


def rescore(base: NAMM, runs, edit) -> dict:
    """The recorded updates scored again with ``edit(x, age)`` applied to the features; a flat ``score`` array in
    the order of :func:`flat`."""
    params = unflatten(base.params, base.config)
    out = []
    for run in runs:
        for rec in run["records"]:
            scores = np.empty(len(rec["pos"]), dtype=np.float32)
            for h in np.unique(rec["head"]):
                idx = np.nonzero(rec["head"] == h)[0]  # already ordered by position
                x = edit(torch.from_numpy(rec["x"][idx]).float(), torch.from_numpy(rec["age"][idx]).long())
                scores[idx] = bam_scores(x[None], torch.ones(1, len(idx), dtype=torch.bool), params)[0].numpy()
            out.append(scores)
    return np.concatenate(out)


def profile_edit(profile, bins):
    def edit(x, age):
        x = x.clone()
        x[:, 8 + bins] = profile[age.clamp(max=MAX_AGE - 1)][:, bins]
        return x

    return edit


def appear_token_held(memory, row, clip) -> float:
    """Share of (layer, KV head) pairs still holding the square's token in the frame where it appeared."""
    from tokenmem.zoo.video_task import CENTRE

    wanted = (clip.spec.appear, CENTRE[0] * 3 + CENTRE[1])
    hits = []
    for layer in memory.layers:
        meta = layer.meta
        for h in range(meta.position.shape[1]):
            v = meta.valid[row, h] & (meta.modality[row, h] == MODALITIES["frame"])
            pairs = set(zip(meta.segment[row, h][v].tolist(), meta.token[row, h][v].tolist()))
            hits.append(wanted in pairs)
    return mean(hits)


def accuracy(qa_base, evictor, clips, budget=BUDGET, batch=12):
    """Three questions per clip, asked as ``tokenmem bench`` asks them (batches of 12, 32-token chunks)."""
    from tokenmem.zoo import video_task
    from tokenmem.zoo.transfer import video_qa

    qa = video_qa(qa_base, evictor, budget, 24)
    items = [(c, k) for c in clips for k in video_task.QUESTIONS]
    hits = {k: [] for k in video_task.QUESTIONS}
    held, appear = [], []
    for s in range(0, len(items), batch):
        part = items[s : s + batch]
        if hasattr(evictor, "reset"):
            evictor.reset()
        answers = qa.ask_many([c.frames for c, _ in part], [video_task.QUESTIONS[k] for _, k in part], max_new_tokens=6)
        for r, ((clip, kind), ans) in enumerate(zip(part, answers)):
            hits[kind].append(ans.text.strip() == clip.answer(kind))
            held.append(ans.report.fraction().mean(0).numpy())  # [frames]
            if kind == "colour":
                appear.append(appear_token_held(ans.memory, r, clip))
    every = [h for v in hits.values() for h in v]
    held = np.mean(held, axis=0)
    return {"all": mean(every), **{k: mean(v) for k, v in hits.items()}, "early": float(held[:8].mean()),
            "middle": float(held[8:16].mean()), "late": float(held[16:].mean()), "appear": mean(appear)}


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=8, help="held-out clips (traced with the colour question; all "
                                                         "three questions in the controlled check)")
    ap.add_argument("--prompts", type=int, default=None, help="eval code-completion prompts cut to the video "
                                                              "prompt's length (default: as many as clips)")
    ap.add_argument("--long-prompts", type=int, default=2, help="full-length prompts in 128-token chunks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-check", action="store_true", help="skip the controlled check (table 9)")
    ap.add_argument("--json", default=None, help="also write the tables' numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    from transformers import AutoModelForCausalLM

    from tokenmem.zoo import stdlib_lm_path, video_lm_path, video_task
    from tokenmem.zoo.lm_tasks import load_records
    from tokenmem.zoo.transfer import video_qa

    out: dict = {"clips": args.clips, "budget": BUDGET, "chunk": CHUNK}
    base = NAMM.pretrained("language")
    qa = video_qa(str(video_lm_path()), "full", None, 24)
    clips = video_task.clips("heldout", args.clips)
    lm = AutoModelForCausalLM.from_pretrained(stdlib_lm_path(), dtype=torch.float32).eval()
    length = qa.encode([qa.load(clips[0].frames)], [video_task.QUESTIONS["colour"]]).input_ids.shape[1] - 1
    records = load_records("code-completion", "eval")
    short = [torch.tensor(r["input_ids"][:length]) for r in records[: args.prompts or args.clips]]
    long = [torch.tensor(r["input_ids"]) for r in records[: args.long_prompts]]
    print(f"video: {len(clips)} held-out clips, prompts of {length} tokens (3 text tokens, 24 frames x 9 tokens, the "
          f"question) streamed in {CHUNK}-token chunks, budget {BUDGET:.0%} of the tokens seen; language: "
          f"{len(short)} eval code-completion prompts cut to {length} tokens (same chunks and budget) and "
          f"{len(long)} full-length ones in 128-token chunks")

    # -- 1. traces ---------------------------------------------------------------------------------------------
    namm = ProbeNAMM(base, record=True)
    v_namm, l_namm = stream_video(qa, namm, clips), stream_language(lm, namm, short, CHUNK)
    g_namm = stream_language(lm, namm, long, 128)
    h2o = ProbeH2O()
    v_h2o, l_h2o = stream_video(qa, h2o, clips), stream_language(lm, h2o, short, CHUNK)
    full_v, full_l = ProbeNAMM(base, "full-observer"), ProbeNAMM(base, "full-observer")
    stream_video(qa, full_v, clips, budget=1.0)
    stream_language(lm, full_l, short, CHUNK, budget=1.0)
    tv, tl, tg, hv, hl = flat(v_namm), flat(l_namm), flat(g_namm), flat(v_h2o), flat(l_h2o)
    frame_v = tv["kind"] == KINDS.index("frame")
    every_l, every_g = tl["age"] >= 0, tg["age"] >= 0
    print(f"traced in {time.time() - t_start:.0f} s: {len(tv['pos'])} video and {len(tl['pos'])} language "
          "token-updates (a token held at an eviction, per layer and KV head)")

    # -- 2. features -------------------------------------------------------------------------------------------
    def ranges(t, sel):
        z, ema = t["x"][sel][:, 8:], t["ema"][sel]
        texture = ema[:, 2:].sum(1) / np.maximum(ema[:, 0], 1e-9)
        return [f3(float(np.median(ema[:, 0]))), f2(float(np.median(z[:, 0]))), f2(float(np.percentile(z[:, 0], 95))),
                f2(float(np.median(z[:, 2:]))), pct(float((np.abs(z) > 3).mean())), f2(float(np.median(texture))),
                pct(mean(t["score"][sel] >= 0))]

    kind = lambda t, k: t["kind"] == KINDS.index(k)  # noqa: E731
    rows = [["video: text before the video (3 tokens)", *ranges(tv, kind(tv, "sink"))],
            ["video: frame tokens", *ranges(tv, frame_v)],
            ["video: question tokens", *ranges(tv, kind(tv, "question"))],
            [f"language, {length} tokens, {CHUNK}-token chunks", *ranges(tl, every_l)],
            ["language, full prompts, 128-token chunks (the calibration setting)", *ranges(tg, every_g)]]
    table("Table 1. EMA spectrogram features at NAMM's updates (held tokens). Raw DC = the decayed attention the "
          f"token received; z = normalised by the language calibration (DC: mean {float(base.norm_mean[0]):.3f}, sd "
          f"{float(base.norm_var[0].sqrt()):.3f}); texture = raw bins 2-16 / raw DC (0 for a constant attention "
          "column, large for a bursty one)",
          ["tokens", "raw DC median", "z DC median", "z DC p95", "z bins 2-16 median", "share of z beyond +-3",
           "texture median", "score >= 0"], rows)
    out["table1_features"] = {r[0]: r[1:] for r in rows}
    shares = {"raw DC": frame_share(tv, frame_v, tv["ema"][:, 0]), "score": frame_share(tv, frame_v, tv["score"])}
    print(f"\n(the frame a token belongs to explains {pct(shares['raw DC'])} of the raw DC variance and "
          f"{pct(shares['score'])} of the score variance among the frame tokens held at one update)")
    out["frame_share_of_variance"] = shares

    rows = []
    for name, t, sel in (("video frame tokens", tv, frame_v), ("language tokens", tl, every_l)):
        rows.append([f"{name}: raw DC", *by_age(t, sel, lambda s, t=t: f3(mean(t["ema"][s][:, 0])))])
        rows.append([f"{name}: z DC", *by_age(t, sel, lambda s, t=t: f2(mean(t["x"][s][:, 8])))])
        rows.append([f"{name}: z bin 1", *by_age(t, sel, lambda s, t=t: f2(mean(t["x"][s][:, 9])))])
        rows.append([f"{name}: z bins 2-16", *by_age(t, sel, lambda s, t=t: f2(mean(t["x"][s][:, 10:].mean(1))))])
        rows.append([f"{name}: attention per query since the last update x tokens held", *by_age(
            t, sel, lambda s, t=t: f2(mean(t["chunk"][s] / t["since"][s] * t["held"][s])))])
        rows.append([f"{name}: NAMM score", *by_age(t, sel, lambda s, t=t: f3(mean(t["score"][s])))])
    table("Table 2. By age (tokens since the token arrived), at NAMM's updates (held tokens)", ["", *AGE_HEADER], rows)
    out["table2_by_age"] = {r[0]: r[1:] for r in rows}

    rows = []
    for label, probe in (("video", full_v), ("language", full_l)):
        for k in KINDS:
            vals = [probe.attention.get((k, name)) for name in AGE_HEADER]
            if any(vals):
                rows.append([f"{label}: {k} keys", *[f2(v[0] / v[1]) if v else "-" for v in vals]])
    table("Table 3. Full cache: the attention a key receives from a query that many tokens later, x the number of "
          "keys the query sees (1.00 = a uniform share; mean over layers, KV heads and queries)", ["keys", *AGE_HEADER],
          rows)
    out["table3_attention_by_distance"] = {r[0]: r[1:] for r in rows}

    # -- 3. keep decisions -------------------------------------------------------------------------------------
    rows = [["namm, video frame tokens", *map(pct, keep_by_age(tv, frame_v))],
            ["h2o, video frame tokens", *map(pct, keep_by_age(hv, hv["kind"] == KINDS.index("frame")))],
            [f"namm, language ({CHUNK}-token chunks)", *map(pct, keep_by_age(tl, every_l))],
            [f"h2o, language ({CHUNK}-token chunks)", *map(pct, keep_by_age(hl, hl["age"] >= 0))],
            ["namm, language full prompts (128-token chunks)", *map(pct, keep_by_age(tg, every_g))]]
    table("Table 4. Chance that a held, unprotected token is kept at one eviction, by its age", ["", *AGE_HEADER], rows)
    out["table4_keep_by_age"] = {r[0]: r[1:] for r in rows}

    rows = []
    for lo, hi, what in ((3, 32, "positions 3-31 (frames 0-3)"), (32, 64, "positions 32-63 (frames 3-6)")):
        for name, runs in (("namm, video", v_namm), ("h2o, video", v_h2o), ("namm, language", l_namm),
                           ("h2o, language", l_h2o)):
            c = cohort(runs, lo, hi)
            rows.append([f"{name}: {what}", *[pct(v, 1) for v in c.values()]])
            header = list(c)
    table("Table 5. A cohort of early tokens, update by update: share still held after the eviction at each number "
          "of tokens seen", ["cohort", *map(str, header)], rows)
    out["table5_cohorts"] = {r[0]: r[1:] for r in rows}

    groups = [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24)]
    rows = [[f"{name}, video (frames)", *[pct(float(s[a:b].mean())) for a, b in groups]]
            for name, s in (("namm", frame_held(v_namm)), ("h2o", frame_held(v_h2o)))]
    for name, runs in (("namm", l_namm), ("h2o", l_h2o)):
        acc = np.mean([np.histogram(held, bins=6, range=(0, length))[0] / (length / 6)
                       for run in runs for _, _, held in run["held"]], axis=0)
        rows.append([f"{name}, language (sixths of the prompt)", *map(pct, acc)])
    table("Table 6. Share held when the prompt ends (video by frames; language by sixth of the prompt)",
          ["", *[f"frames {a}-{b - 1} / sixth {i + 1}" for i, (a, b) in enumerate(groups)]], rows)
    out["table6_held_at_end"] = {r[0]: r[1:] for r in rows}

    # -- 4. score drivers --------------------------------------------------------------------------------------
    rows = []
    for name, t in (("video", tv), ("language", tl), ("language full prompts", tg)):
        fits = [linear_r2(t, c) for c in (list(range(25)), list(range(8)), [0, 4], list(range(8, 25)), [8, 9],
                                          list(range(10, 25)))]
        rows.append([name, f3(float(t["score"].std())), *map(f2, fits), f"{score_period(t):.1f}"])
    table("Table 7. What the score follows: R^2 of least-squares fits of the score on feature groups (all held "
          "tokens at all updates), and the period of the mean score in the age",
          ["", "score sd", "all 25", "recency (8)", "sin/cos(age) only", "EMA (17)", "EMA bins 0-1", "EMA bins 2-16",
           "period in age (tokens)"], rows)
    out["table7_fits"] = {r[0]: r[1:] for r in rows}

    profile = language_profile(tl)
    edits = [("shipped (recorded scores)", None),
             ("EMA bins 0-1 (level) = language profile", profile_edit(profile, torch.tensor([0, 1]))),
             ("EMA bins 2-16 (texture) = language profile", profile_edit(profile, torch.arange(2, 17))),
             ("all EMA bins = language profile", profile_edit(profile, torch.arange(17)))]
    rows = []
    for name, edit in edits:
        s = tv["score"] if edit is None else rescore(base, v_namm, edit)
        young = mean(s[frame_v & (tv["age"] < 32)])
        rows.append([name, *by_age(tv, frame_v, lambda sel, s=s: f3(mean(s[sel]))),
                     f"{mean(s[frame_v & (tv['age'] >= 64)]) - young:+.3f}"])
    rows.append(["(language tokens, recorded)", *by_age(tl, every_l, lambda s: f3(mean(tl["score"][s]))),
                 f"{mean(tl['score'][tl['age'] >= 64]) - mean(tl['score'][tl['age'] < 32]):+.3f}"])
    table("Table 8. Video frame tokens' mean score by age at the recorded updates, rescored with EMA bins replaced by "
          "the mean of language tokens of the same age (language profile; the real age and recency features kept)",
          ["scores", *AGE_HEADER, "age >= 64 minus age < 32"], rows)
    out["table8_rescored"] = {r[0]: r[1:] for r in rows}

    # -- 5. controlled check -----------------------------------------------------------------------------------
    if not args.skip_check:
        t0 = time.time()
        configs = [("namm (shipped)", base),
                   ("namm, recency features frozen (age 0)", ProbeNAMM(base, "recency-const")),
                   ("namm, sin/cos(age) pair frozen (age 0)", ProbeNAMM(base, "recency-fast")),
                   ("namm, EMA features = 0 (language mean)", ProbeNAMM(base, "ema-zero")),
                   ("namm, EMA bins 0-1 = language profile", ProbeNAMM(base, "ema-profile", profile=profile,
                                                                         bins=[0, 1])),
                   ("namm, EMA bins 2-16 = language profile", ProbeNAMM(base, "ema-profile", profile=profile,
                                                                          bins=list(range(2, 17)))),
                   ("namm, all EMA bins = language profile", ProbeNAMM(base, "ema-profile", profile=profile)),
                   ("h2o", "h2o"), ("recent", "recent")]
        rows = []
        for name, ev in configs:
            r = accuracy(qa, ev, clips)
            rows.append([name, pct(r["all"], 1), pct(r["colour"], 1), pct(r["circle"], 1), pct(r["move"], 1),
                         pct(r["early"], 1), pct(r["middle"], 1), pct(r["late"], 1), pct(r["appear"], 1)])
        table(f"Table 9. Controlled check: {len(clips)} held-out clips x 3 questions, budget {BUDGET:.0%}, "
              f"{CHUNK}-token chunks, batches of 12 as in tokenmem bench",
              ["memory", "accuracy", "colour", "circle", "move", "held of frames 0-7", "of frames 8-15",
               "of frames 16-23", "(layer, head) pairs holding the square's token in its appear frame"], rows)
        out["table9_check"] = {r[0]: r[1:] for r in rows}
        print(f"\n(controlled check: {time.time() - t0:.0f} s)")
    print(f"\ntotal {time.time() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
