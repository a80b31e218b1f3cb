"""Which tokens an eviction keeps: pure functions of scores, protection and metadata.

:func:`choose_kept` is the whole decision of one eviction (the memory then compacts to its indices);
:func:`select_kept` ranks tokens, :func:`whole_segments` groups them into segments
(``TokenMemory(evict_unit="segment")``).
"""

from __future__ import annotations

import torch

from .errors import BudgetError, TokenmemError
from .meta import MODALITIES, TokenMeta


def choose_kept(scores: torch.Tensor, protect: torch.Tensor | None, meta: TokenMeta, keep: int | None, *,
                threshold: float | None = None, segments: bool = False, grow_budget: bool = False,
                who: str = "the evictor", layer: int | None = None, seen: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slots one eviction keeps: ``(index [b, h, k] ascending, kept_ok [b, h, k] or None)``.

    ``scores`` ``[b, h, n]`` (higher keeps) and ``protect`` (the evictor's mask, broadcastable, or None) are
    the evictor's; tokens flagged ``protect`` in ``meta`` are kept too, padding never. ``keep`` caps the count
    (None: no cap). A ``threshold`` keeps only tokens scoring at least it; ``segments`` keeps or drops whole
    segments (:func:`whole_segments`). Both are *ragged*: batch rows and heads may want fewer than ``k``
    slots, and ``kept_ok`` marks the slots each really keeps (the memory masks the others). ``grow_budget``
    (a fractional budget) lets the protected tokens exceed ``keep`` instead of raising :class:`BudgetError`;
    ``who``, ``layer`` and ``seen`` (tokens seen) name the evictor and the place in error messages.
    """
    b, h, n = meta.position.shape
    if bool(torch.isnan(scores).any()):
        raise TokenmemError(f"{who} returned NaN scores on layer {layer}")
    valid = meta.valid
    protect = meta.is_protected if protect is None else (protect | meta.is_protected)
    protect = protect.expand(b, h, n) & valid
    eligible = valid
    if segments:
        protect, eligible = whole_segments(meta, scores, protect, valid, keep, threshold)
    most = int(protect.sum(-1).max())
    if keep is not None and most > keep and grow_budget:
        keep = most  # a fraction of a short stream (a DT's first steps) may be less than the protected tokens
    if keep is not None and most > keep:
        whole = " (with evict_unit='segment', whole segments of protected tokens)" if segments else ""
        raise BudgetError(
            f"budget of {keep} tokens is smaller than the {most} tokens {who} protects{whole} on layer {layer} "
            f"(after {seen} tokens seen); raise the budget or protect fewer tokens"
        )
    ragged = segments or threshold is not None  # rows and heads may keep different counts
    if segments:
        keep = max(1, int(eligible.sum(-1).max()))
    elif threshold is not None:
        eligible = valid & ((scores >= threshold) | protect)
        count = max(1, int(eligible.sum(-1).max()))
        keep = count if keep is None else min(keep, count)
    index = select_kept(scores, protect, eligible, keep)
    return index, (torch.gather(eligible, 2, index) if ragged else None)


def select_kept(scores: torch.Tensor, protect: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices ``[b, h, keep]`` (ascending) of the tokens to keep: protected first, then highest score,
    ties broken in favour of newer tokens (deterministic on every device); padding last.
    ``scores``/``protect``/``valid`` are ``[b, h, n]`` in slot (= position) order."""
    key = torch.where(valid, scores.to(torch.float32), float("-inf"))
    key = torch.where(protect, float("inf"), key)
    n = key.shape[-1]
    # a stable sort of the slots newest-first: among equal keys the newer slot comes first
    order = torch.sort(key.flip(-1), dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(n - 1 - order, dim=-1).values


def whole_segments(meta: TokenMeta, scores: torch.Tensor, protect: torch.Tensor, valid: torch.Tensor,
                   keep: int | None, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment-granularity selection (``TokenMemory(evict_unit="segment")``): ``(protect, eligible)``, bool
    ``[b, h, n]``, where whole *units* are kept or dropped.

    A unit is all tokens of one segment (a video frame, a timestep) for tokens that are not text and have a
    segment >= 0; every other token is a unit of its own. A unit scores the mean of its tokens' scores and is
    protected whole when any of its tokens is protected. Units are taken protected first, then by score (ties:
    the unit with the newest token first), as long as their tokens fit in ``keep`` (``None``: no cap); a
    threshold evictor also needs its unit's score >= ``threshold``. Filling stops at the first unit that does
    not fit, so fewer than ``keep`` tokens may stay, never more. Padding (``~valid``) belongs to no unit.
    """
    b, h, n = scores.shape
    grouped = (meta.segment >= 0) & (meta.modality != MODALITIES["text"])
    segment_ids = torch.unique(torch.where(grouped, meta.segment, -1), return_inverse=True)[1]  # compact ids
    slot = torch.arange(n, device=scores.device).expand(b, h, n)
    units = int(segment_ids.max()) + 1 + n
    unit = torch.where(grouped, segment_ids, units - n + slot)  # [b, h, n] unit of each token
    zeros = torch.zeros(b, h, units, device=scores.device)
    size = zeros.scatter_add(2, unit, valid.float())  # [b, h, units] tokens per unit
    total = zeros.scatter_add(2, unit, torch.where(valid, scores.float(), 0.0))
    guarded = zeros.scatter_reduce(2, unit, (protect & valid).float(), "amax") > 0
    newest = zeros.scatter_reduce(2, unit, torch.where(valid, slot, -1).float(), "amax")
    key = torch.where(guarded, float("inf"), total / size.clamp(min=1))
    key = torch.where(size > 0, key, float("-inf"))
    # order units by key (descending), ties towards the newest unit: a stable sort of a newest-first order
    order = torch.sort(newest, dim=-1, descending=True, stable=True).indices
    order = order.gather(2, torch.sort(key.gather(2, order), dim=-1, descending=True, stable=True).indices)
    fits = size.gather(2, order).cumsum(-1) <= (n if keep is None else keep)
    if threshold is not None:
        fits &= key.gather(2, order) >= threshold
    kept = torch.zeros_like(fits).scatter(2, order, fits)
    return guarded.gather(2, unit) & valid, kept.gather(2, unit) & valid
