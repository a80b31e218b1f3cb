"""``infinipot_v``: InfiniPot-V -- drop temporally redundant video tokens first, then keep high value norms.

Kim, Shim, Choi, Chang, "InfiniPot-V: Memory-Constrained KV Cache Compression for Streaming Video
Understanding" (2025, arXiv:2506.15745): a query-agnostic, training-free rule for streaming video. Two
signals: *temporal-axis redundancy* (TaR) -- a patch that looks like the same patch of the previous frame adds
nothing, measured by the cosine similarity of the keys at the same spatial position -- and *value norm* (VaN)
-- among the rest, tokens with large value vectors carry more. Here:

* video tokens are the tokens of modality ``frame`` with a segment >= 0; their segment is the frame index and
  ``TokenMeta.token`` their index inside the frame (what :mod:`tokenmem.adapters.video` stores);
* a video token's redundancy is the cosine similarity of its key with the key of the newest *earlier* held
  frame's token at the same index (``lookback`` frames back at most; ``None``: any earlier held frame, so a
  patch whose previous copy was already dropped is compared with the copy that stayed). Keys are compared
  un-rotated (brought back to position 0 with the model's RoPE frequencies), since the same content at
  another position is rotated differently; ``compare="values"`` compares values instead;
* eviction order: first the redundant video tokens (similarity >= ``tau``; the most similar first), then the
  other video tokens by value norm (lowest first), and last every non-video token (text, ...) by recency
  (oldest first): text is few tokens in a video prompt and the question is what gets answered.

The paper splits the budget between a TaR pass and a VaN pass with a ratio; the threshold ``tau`` here makes
the order explicit instead. With ``evict_unit="segment"`` (``VideoQA(evict_unit="frame")``) a frame scores the
mean of its tokens, so repeated frames go first as a whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmem.errors import TokenmemError
from tokenmem.evictor import Evictor, LayerView, register_evictor
from tokenmem.meta import MODALITIES
from tokenmem.scoring import check_choice, rope_frequencies, unrotate

FRAME = MODALITIES["frame"]


def temporal_redundancy(view: LayerView, lookback: int | None = None, compare: str = "keys") -> torch.Tensor:
    """``[b, h, n]`` float32: for each video token, the cosine similarity with the same spatial token (same
    ``meta.token``) of the newest earlier held frame (at most ``lookback`` frames back); 0 for tokens with no
    such predecessor and for non-video tokens."""
    meta = view.meta
    b, h, n = meta.position.shape
    video = (meta.modality == FRAME) & (meta.segment >= 0) & meta.valid & (meta.token >= 0)
    if not bool(video.any()):
        return torch.zeros(b, h, n, device=view.keys.device)
    if compare == "keys":
        vectors = unrotate(view.keys.float(), meta.rope, rope_frequencies(view))
    else:
        vectors = view.values.float()
    unit = F.normalize(vectors, dim=-1)  # [b, h, n, d]
    frames = int(meta.segment.max()) + 2
    # sort by (spatial index, frame); non-video tokens last
    sort_key = torch.where(video, meta.token * frames + meta.segment, torch.iinfo(torch.long).max)
    order = torch.sort(sort_key, dim=-1, stable=True).indices  # [b, h, n]
    s_tok = meta.token.gather(2, order)
    s_seg = meta.segment.gather(2, order)
    s_vid = video.gather(2, order)
    s_unit = unit.gather(2, order[..., None].expand_as(unit))
    prev_ok = s_vid[..., 1:] & s_vid[..., :-1] & (s_tok[..., 1:] == s_tok[..., :-1]) & (s_seg[..., :-1] < s_seg[..., 1:])
    if lookback is not None:
        prev_ok &= s_seg[..., 1:] - s_seg[..., :-1] <= lookback
    sim = (s_unit[..., 1:, :] * s_unit[..., :-1, :]).sum(-1)  # [b, h, n - 1]
    sorted_sim = torch.cat([torch.zeros(b, h, 1, device=sim.device), torch.where(prev_ok, sim, 0.0)], -1)
    return torch.zeros(b, h, n, device=sim.device).scatter(2, order, sorted_sim)


@register_evictor("infinipot_v")
class InfiniPotVEvictor(Evictor):
    name = "infinipot_v"
    description = "InfiniPot-V: drops video tokens repeating the previous frame first, then low value norms; text by recency"

    def __init__(self, tau: float = 0.9, lookback: int | None = None, compare: str = "keys"):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not -1.0 <= tau <= 1.0:
            raise TokenmemError(f"tau (the cosine similarity above which a video token is redundant) must lie in "
                                f"[-1, 1], got {tau!r}")
        if lookback is not None and (isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 1):
            raise TokenmemError(f"lookback must be None or an int >= 1 (frames), got {lookback!r}")
        check_choice("compare", compare, ("keys", "values"))
        self.tau, self.lookback, self.compare = float(tau), lookback, compare

    def score(self, view: LayerView) -> torch.Tensor:
        meta = view.meta
        video = (meta.modality == FRAME) & (meta.segment >= 0)
        similarity = temporal_redundancy(view, self.lookback, self.compare)
        redundant = video & (similarity >= self.tau)
        vnorm = torch.linalg.vector_norm(view.values.float(), dim=-1)
        vnorm = vnorm / (vnorm.amax(-1, keepdim=True) * (1 + 1e-6)).clamp(min=1e-12)  # [0, 1)
        recency = meta.position.float() / (meta.position.amax(-1, keepdim=True).float() + 1)  # [0, 1)
        scores = torch.where(video, 1.0 + vnorm, 2.0 + recency)  # video below every other token
        return torch.where(redundant, (1.0 - similarity).clamp(0, 1.98) / 2, scores)  # redundant below the rest

    def __repr__(self) -> str:
        return f"InfiniPotVEvictor(tau={self.tau}, lookback={self.lookback}, compare={self.compare!r})"
