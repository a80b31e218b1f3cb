"""The NAMM evictor: features -> BAM scorer -> keep tokens scoring >= 0.

Continuously, every ``hop`` queries, the attention rows of those queries (the memory's row window;
GQA: mean over each KV head's query group) extend every token's EMA spectrogram by one STFT frame
(:mod:`.features`), stored as per-token evictor state that the memory compacts with the token.
Per update (every ``interval`` tokens, which the memory runs as an eviction):

1. (the EMA is up to date: every completed frame was folded in as it arrived);
2. features = ``[recency(age), normalised EMA]`` (25 values by default), and with ``key_diff`` one more: the
   token's key distinctiveness (KeyDiff's score, :func:`tokenmem.scoring.key_distinctiveness`);
3. the BAM network scores every token of every (layer, KV head) with one shared parameter vector;
4. the memory keeps tokens scoring ``>= threshold`` (0) plus the newest token; heads and batch rows
   may keep different counts, which the memory holds by masking (see ``TokenMemory.evict_layer``).
   A budget, if given, caps the kept count by top score, so memory stays bounded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tokenmem.errors import TokenmemError
from tokenmem.evictor import Evictor, LayerView, register_evictor
from tokenmem.scoring import key_distinctiveness

from .config import NAMMConfig
from .features import normalise, recency_features, update_ema, update_ema_aligned
from .io import read_scorer, write_scorer
from .scorer import bam_scores, initial_params, num_params, unflatten

#: Directories whose sub-directories are shipped scorers (``NAMM.pretrained(name)``); the tokenmem package
#: registers its own (``tokenmem/zoo/scorers``) when it is imported.
SCORER_DIRS: list[Path] = []


def register_scorer_dir(path) -> None:
    """Make the scorers in the sub-directories of ``path`` loadable by name with :meth:`NAMM.pretrained`."""
    path = Path(path)
    if path not in SCORER_DIRS:
        SCORER_DIRS.append(path)


@register_evictor("namm")
class NAMM(Evictor):
    name = "namm"
    description = "NAMM: evolved attention-spectrogram scorer (BAM); keeps tokens scoring >= 0"

    def __init__(self, config: NAMMConfig | None = None, params: torch.Tensor | None = None,
                 norm_mean: torch.Tensor | None = None, norm_var: torch.Tensor | None = None, *,
                 rows_chunk: int = 256, **fields):
        if config is not None and fields:
            raise TokenmemError("pass either a NAMMConfig or config fields, not both")
        self.config = config or NAMMConfig(**fields)
        cfg = self.config
        self.params = (initial_params(cfg) if params is None else torch.as_tensor(params, dtype=torch.float32)).clone()
        if self.params.shape != (num_params(cfg),):
            raise TokenmemError(
                f"NAMM parameter vector has shape {tuple(self.params.shape)}, expected ({num_params(cfg)},) "
                f"for {cfg.features} features and hidden {cfg.hidden}"
            )
        self.norm_mean = torch.zeros(cfg.bins) if norm_mean is None else torch.as_tensor(norm_mean, dtype=torch.float32)
        self.norm_var = torch.ones(cfg.bins) if norm_var is None else torch.as_tensor(norm_var, dtype=torch.float32)
        self.threshold = cfg.threshold
        self.stats_window = cfg.hop  # at most hop - 1 rows wait between calls (observe folds every complete hop)
        self.rows_chunk = rows_chunk  # a prefill chunk's rows reach observe in one piece (see TokenMemory)
        self.default_interval = cfg.interval
        self.calibrating = False
        self._calib = None  # running (count, mean, M2) per bin while calibrating

    # -- scorer files ------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path) -> "NAMM":
        return cls(*read_scorer(path))

    @classmethod
    def pretrained(cls, name: str = "language") -> "NAMM":
        """A scorer shipped with tokenmem: ``"language"`` (v3, with the key feature), evolved on the shipped
        standard-library model's code completion, early-planted retrieval and streaming perplexity
        (``tokenmem/zoo/scorers/language``, with its card and evolution log) and used unchanged on every modality;
        ``"language-v2"`` (the paper's features) and ``"language-v1"`` (the first, shorter evolution) are kept for
        comparison. Looked up in :data:`SCORER_DIRS`."""
        for root in SCORER_DIRS:
            if (root / name / "scorer.json").exists():
                return cls.from_file(root / name)
        looked = ", ".join(str(root / name) for root in SCORER_DIRS) or "no scorer directory is registered"
        known = sorted(p.name for root in SCORER_DIRS if root.exists() for p in root.iterdir()
                       if (p / "scorer.json").exists())
        raise TokenmemError(f"no shipped NAMM scorer named {name!r} (looked in {looked}); shipped: "
                            f"{', '.join(known) or 'none'}; load your own with NAMM.from_file(path)")

    @classmethod
    def load(cls, spec) -> "NAMM":
        """``spec``: a shipped scorer's name (``"language"``), ``"initial"`` (the untrained initial scorer),
        or a scorer directory/file path."""
        if spec == "initial":
            return cls()
        if os.path.exists(str(spec)):
            return cls.from_file(spec)
        if os.sep in str(spec) or str(spec).endswith(".json"):
            raise TokenmemError(f"NAMM scorer path {spec!r} does not exist; pass a scorer directory, a shipped "
                                "name (e.g. 'language') or 'initial'")
        return cls.pretrained(str(spec))

    def save(self, path) -> None:
        write_scorer(path, self.config, self.params, self.norm_mean, self.norm_var)

    def with_params(self, params: torch.Tensor) -> "NAMM":
        """A NAMM with the same config and normalisation and another parameter vector."""
        return NAMM(self.config, params, self.norm_mean, self.norm_var)

    # -- normalisation calibration ---------------------------------------------------------------------
    def start_calibration(self) -> None:
        """Accumulate per-bin mean/variance of the EMA features from now on (then :meth:`freeze`)."""
        self.calibrating = True
        self._calib = (0, torch.zeros(self.config.bins, dtype=torch.float64), torch.zeros(self.config.bins, dtype=torch.float64))

    def freeze(self) -> None:
        """Stop calibrating and use the accumulated statistics."""
        if self._calib is None or self._calib[0] < 2:
            raise TokenmemError("NAMM calibration saw fewer than 2 tokens; run some text through it before freeze()")
        count, mean, m2 = self._calib
        self.norm_mean, self.norm_var = mean.float(), (m2 / (count - 1)).float()
        self.calibrating, self._calib = False, None

    def _accumulate(self, ema: torch.Tensor, valid: torch.Tensor) -> None:
        x = ema[valid].to(torch.float64).cpu()  # [tokens, bins]
        if x.shape[0] == 0:
            return
        count, mean, m2 = self._calib
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        total = count + n_b
        delta = mean_b - mean
        self._calib = (total, mean + delta * n_b / total, m2 + m2_b + delta**2 * count * n_b / total)

    # -- the Evictor protocol ------------------------------------------------------------------
    def state_spec(self):
        cfg = self.config
        return {"namm_ema": ((cfg.bins,), torch.float32), "namm_tail": ((cfg.tail,), torch.float32)}

    def protect(self, view: LayerView) -> torch.Tensor:
        return view.newest(1)

    def observe(self, view: LayerView) -> None:
        """Fold every complete hop of attention rows into the EMA spectrogram (one STFT frame per hop).

        Streaming frame by frame gives exactly the batch definition (STFT over the queries since the
        last update, left-padded with the previous ``n_fft - hop`` samples, frames that end before a
        token existed masked, EMA ``ema**hop`` per frame): a token absent when a frame completes was not
        yet stored, and its state and tail start at zero. All complete hops are folded in one update (a
        frame that ends before a token existed sees only zeros, so it adds nothing); fewer than ``hop`` rows
        wait in the memory for the next call. With ``rows_chunk`` the memory hands a prefill chunk's rows
        over in one piece, so a 128-token chunk costs one kernel call and one update per layer, not eight.
        """
        cfg = self.config
        rows = view.rows
        done = 0
        if rows is not None and rows.shape[2] >= cfg.hop:  # every complete hop at once (frames are independent)
            done = rows.shape[2] // cfg.hop * cfg.hop
            ema, tail = view.state["namm_ema"], view.state["namm_tail"]
            if cfg.n_fft == 2 * cfg.hop:
                new_ema, new_tail = update_ema_aligned(ema, tail, rows[:, :, :done], cfg)
            else:
                first = torch.zeros(ema.shape[:3], dtype=torch.long, device=ema.device)
                new_ema, new_tail = update_ema(ema, tail, rows[:, :, :done], first, cfg)
            ema.copy_(new_ema)
            tail.copy_(new_tail)
        if done:
            view.consume_rows(done)

    def features(self, view: LayerView) -> torch.Tensor:
        """Features ``[b, h, n, recency_dim + bins (+ 1)]``: recency embedding of the age, normalised EMA (and, with
        ``key_diff``, the key distinctiveness, bounded in [-1, 1] and not normalised)."""
        cfg = self.config
        ema = view.state["namm_ema"]
        positions = view.meta.position
        newest = positions.amax(dim=-1, keepdim=True)  # [b, h, 1]
        if self.calibrating:
            self._accumulate(ema, view.meta.valid)
        age = newest - positions
        z = normalise(ema, self.norm_mean.to(ema.device), self.norm_var.to(ema.device), cfg)
        parts = [recency_features(age, cfg), z]
        if cfg.key_diff:
            parts.append(key_distinctiveness(view.keys, view.meta.valid)[..., None])
        return torch.cat(parts, dim=-1)

    def score(self, view: LayerView) -> torch.Tensor:
        x = self.features(view)
        b, h, n, f = x.shape
        params = unflatten(self.params.to(x.device), self.config)
        scores = bam_scores(x.reshape(b * h, n, f), view.meta.valid.reshape(b * h, n), params, self.config.block)
        return scores.view(b, h, n)

    def __repr__(self) -> str:
        return f"NAMM(interval={self.config.interval}, threshold={self.config.threshold})"


def load_scorer(path) -> NAMM:
    """A NAMM from a scorer directory (``scorer.json`` + ``scorer.safetensors``)."""
    return NAMM.from_file(path)


def save_scorer(namm: NAMM, path) -> None:
    """Write ``namm``'s scorer files to the directory ``path``."""
    namm.save(path)
