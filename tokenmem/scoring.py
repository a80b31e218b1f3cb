"""Pieces shared by the score-based evictors (SnapKV, TOVA, KeyDiff, Knorm, Expected Attention, InfiniPot-V)
and the budget allocators (PyramidKV, AdaKV): written once here, used by every plugin.

* :func:`window_attention` -- mean attention the newest queries paid to each key (``view.rows``);
* :func:`key_distinctiveness` -- minus the cosine of each key with its head's mean key (KeyDiff; NAMM's optional
  key feature);
* :func:`pool_tokens` -- 1-D average / max pooling of scores over neighbouring slots (SnapKV's clustering);
* :func:`average_heads` -- one decision per layer: scores averaged over the KV heads (TOVA);
* :func:`rank_keys` / :func:`keep_counts` -- keep, per (row, head), the protected tokens then the best-scored
  ones up to a count that may differ per head;
* :func:`pyramid_budgets` -- layer budgets that shrink linearly with depth at a fixed total (PyramidKV);
* :func:`share_across_heads` -- one layer budget shared by the heads by score, with a per-head floor and cap
  (AdaKV);
* :func:`allocation_scores` -- +1 / -1 scores marking exactly an allocation's kept tokens, for threshold
  evictors (``threshold = 0``) whose rows and heads keep different counts (held by masking, see
  :meth:`tokenmem.TokenMemory.evict_layer`);
* :func:`rope_frequencies`, :func:`layer_count`, :func:`unrotate` -- what an evictor may need to know about the
  model (rotary frequencies, number of layers) but :class:`~tokenmem.LayerView` does not carry yet.

Imports only the core (``torch``, :mod:`tokenmem.evictor`, :mod:`tokenmem.rope`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .errors import TokenmemError
from .evictor import Evictor, LayerView, get_evictor
from .rope import rotate_by

POOLS = ("avg", "max")


# ---------------------------------------------------------------------------------------------
# Scores from attention rows
# ---------------------------------------------------------------------------------------------
def window_attention(view: LayerView, window: int | None = None) -> torch.Tensor:
    """``[b, h, n]`` float32: the mean attention each key received from the newest ``window`` queries whose rows
    the memory holds (``view.rows``; GQA: already the mean over the KV head's query group). Rows of padding
    queries (all zero) are left out of the mean; without rows, zeros."""
    b, h, n = view.meta.position.shape
    rows = view.rows
    if rows is None or rows.shape[2] == 0:
        return torch.zeros(b, h, n, device=view.keys.device)
    if window is not None:
        rows = rows[:, :, -window:]
    live = (rows.sum(-1) > 0).sum(-1, keepdim=True).clamp(min=1)  # [b, h, 1] queries that attended
    return rows.sum(2) / live


def key_distinctiveness(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[b, h, n]`` float32: minus the cosine similarity between each key ``keys [b, h, n, d]`` and the anchor,
    the mean of the L2-normalised keys of the real tokens (``valid [b, h, n]``) of its (row, KV head): KeyDiff's
    score (Park et al. 2025, arXiv:2504.15364), in [-1, 1], larger for keys that point away from the rest."""
    keys = keys.float()
    unit = F.normalize(keys, p=2, dim=-1) * valid[..., None]
    anchor = unit.sum(2, keepdim=True) / valid.sum(-1)[..., None, None].clamp(min=1)  # [b, h, 1, d]
    return -F.cosine_similarity(keys, anchor, dim=-1)


def pool_tokens(scores: torch.Tensor, kernel_size: int, mode: str = "avg", valid: torch.Tensor | None = None
                ) -> torch.Tensor:
    """1-D pooling of ``scores [b, h, n]`` over neighbouring tokens (stride 1, zero padding of ``kernel_size // 2``
    on both sides; ``"avg"`` divides by ``kernel_size`` even at the edges, as SnapKV and kvpress do). With
    ``valid [b, h, n]`` the neighbours are the neighbouring *valid* tokens in stream order: padding and slots
    masked by a ragged eviction are skipped (their scores come out 0), so a row pools the same way whatever
    masked slots its batch left between its tokens."""
    if mode not in POOLS:
        raise TokenmemError(f"pooling must be one of {POOLS}, got {mode!r}")
    if kernel_size <= 1:
        return scores if valid is None else torch.where(valid, scores, 0.0)
    b, h, n = scores.shape
    order = None
    if valid is not None:  # valid tokens first, in slot order
        order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
        packed_valid = valid.gather(-1, order)
        scores = torch.where(packed_valid, scores.gather(-1, order), 0.0)
    x = scores.reshape(b * h, 1, n).float()
    pad = kernel_size // 2
    if mode == "avg":
        y = F.avg_pool1d(x, kernel_size, stride=1, padding=pad, count_include_pad=True)
    else:  # explicit zero padding: scores are >= 0, and an empty window edge should not win
        y = F.max_pool1d(F.pad(x, (pad, pad)), kernel_size, stride=1)
    y = y[..., :n].reshape(b, h, n)
    if order is None:
        return y
    y = torch.where(packed_valid, y, 0.0)
    return torch.zeros_like(y).scatter(-1, order, y)


def newest_valid(view: LayerView, count: int) -> torch.Tensor:
    """Bool ``[b, h, n]``: the ``count`` newest valid tokens of each row and head (unlike ``view.newest``, slots
    masked by a ragged eviction do not use up the window)."""
    valid = view.meta.valid
    rank = torch.flip(torch.cumsum(torch.flip(valid.to(torch.int32), [-1]), -1), [-1])  # 1 = the newest valid
    return valid & (rank <= count)


def average_heads(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[b, h, n]`` scores replaced by their mean over the KV heads (every head then takes the same decision,
    as TOVA does). ``valid [b, h, n]`` leaves masked slots out of the mean."""
    if valid is None:
        return scores.mean(1, keepdim=True).expand_as(scores)
    w = valid.to(scores.dtype)
    mean = (scores * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
    return mean.expand_as(scores)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise TokenmemError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_count(name: str, value, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TokenmemError(f"{name} must be an int >= {low}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Keeping per (row, head) counts
# ---------------------------------------------------------------------------------------------
def rank_keys(scores: torch.Tensor, protect: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[b, h, n]`` long: each token's rank in its (row, head), 0 = kept first. Protected tokens first, then by
    score, ties in favour of the newer slot (as :func:`tokenmem.select_kept`), padding/masked slots last."""
    n = scores.shape[-1]
    key = torch.where(valid, scores.float(), float("-inf"))
    key = torch.where(protect & valid, float("inf"), key)
    order = torch.sort(key.flip(-1), dim=-1, descending=True, stable=True).indices  # newest-first stable order
    order = n - 1 - order
    return torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))


def keep_counts(scores: torch.Tensor, protect: torch.Tensor, valid: torch.Tensor, counts) -> torch.Tensor:
    """Bool ``[b, h, n]``: per (row, head) the protected tokens, then the best-scored ones, ``counts`` in all (an
    int or a ``[b, h]`` tensor; protected tokens are kept even beyond it). Padding is never kept."""
    rank = rank_keys(scores, protect, valid)
    counts = torch.as_tensor(counts, device=scores.device)
    while counts.dim() < 3:
        counts = counts[..., None]
    return ((rank < counts) | protect) & valid


def allocation_scores(keep: torch.Tensor) -> torch.Tensor:
    """+1 where an allocation keeps a token, -1 elsewhere: the scores of a threshold evictor (``threshold = 0``)
    that keeps exactly ``keep``."""
    return torch.where(keep, 1.0, -1.0)


# ---------------------------------------------------------------------------------------------
# Budget allocation across layers (PyramidKV) and across heads (AdaKV)
# ---------------------------------------------------------------------------------------------
def _exact_total(ideal: list[float], total: int) -> list[int]:
    """Integers close to ``ideal`` (non-increasing) that sum to ``total``: floors, then the remainder to the
    largest fractional parts (ties to the shallower layer), which keeps the order non-increasing."""
    floors = [math.floor(x + 1e-9) for x in ideal]
    rest = total - sum(floors)
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - floors[i]), i))
    for i in order[: max(rest, 0)]:
        floors[i] += 1
    return floors


def pyramid_budgets(average: int, num_layers: int, beta: float = 20.0, cap: int | None = None) -> list[int]:
    """Tokens per KV head for each layer: a linear pyramid from ``2 * average - average / beta`` (layer 0) down to
    ``average / beta`` (last layer), whose sum is ``num_layers * average`` exactly (PyramidKV's schedule, Cai et
    al. 2024; the same formula as kvpress's ``PyramidKVPress.get_layer_budget``, which rounds each layer on its
    own). With ``cap`` (the most a layer may hold), layers above it are held at the cap and the surplus is
    spread over the deeper layers (still non-increasing), so the total stays ``num_layers * average`` whenever
    ``num_layers * cap`` allows it."""
    check_count("num_layers", num_layers, 1)
    if beta < 1:
        raise TokenmemError(f"beta must be >= 1 (the pyramid's steepness), got {beta}")
    total = num_layers * int(average)
    if num_layers == 1:
        ideal = [float(average)]
    else:
        low = average / beta
        high = 2 * average - low
        step = (high - low) / (num_layers - 1)
        ideal = [high - i * step for i in range(num_layers)]
    budgets = _exact_total(ideal, total)
    if cap is None or max(budgets) <= cap:
        return budgets
    if cap * num_layers <= total:
        return [cap] * num_layers
    lo, hi = 0, cap  # the smallest lift t with sum(min(cap, b + t)) >= total
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(min(cap, b + mid) for b in budgets) >= total:
            hi = mid
        else:
            lo = mid + 1
    lifted = [min(cap, b + lo) for b in budgets]
    excess = sum(lifted) - total  # fewer than the layers below the cap (lo is minimal): take 1 from the deepest
    for i in range(num_layers - 1, -1, -1):
        if excess == 0:
            break
        if lifted[i] < cap and lo > 0:
            lifted[i] -= 1
            excess -= 1
    return lifted


def share_across_heads(scores: torch.Tensor, protect: torch.Tensor, valid: torch.Tensor, total: int,
                       floor: int = 0, cap: int | None = None) -> torch.Tensor:
    """Bool ``[b, h, n]``: AdaKV's allocation (Feng et al. 2024). Per batch row the layer keeps ``total`` tokens
    over all its KV heads, the best-scored ones across heads (scores must be comparable across heads: attention
    probabilities are); protected tokens come first and every head first keeps its best ``floor`` tokens (the
    safeguard), and no head keeps more than ``cap`` (``None``: no cap). Ties go to the newer slot."""
    b, h, n = scores.shape
    rank = rank_keys(scores, protect, valid)  # [b, h, n] rank inside the head
    guarded = (protect & valid) | ((rank < floor) & valid)
    allowed = valid if cap is None else valid & ((rank < cap) | (protect & valid))
    tier = torch.where(guarded, 2, torch.where(allowed, 1, 0))  # forced, competing, never
    flat_scores = scores.float().reshape(b, h * n)
    flat_tier = tier.reshape(b, h * n)
    slot = torch.arange(n, device=scores.device).repeat(h)[None].expand(b, -1)
    # order: tier desc, score desc, slot desc (newest first), by successive stable sorts
    order = torch.sort(slot, dim=-1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(flat_scores.gather(1, order), dim=-1, descending=True, stable=True).indices)
    order = order.gather(1, torch.sort(flat_tier.gather(1, order), dim=-1, descending=True, stable=True).indices)
    forced = guarded.reshape(b, -1).sum(-1, keepdim=True)
    take = torch.clamp(torch.full_like(forced, int(total)), min=0)
    take = torch.maximum(take, forced)  # the protected tokens and the floors always stay
    position = torch.arange(h * n, device=scores.device)[None].expand(b, -1)
    chosen = (position < take) & (flat_tier.gather(1, order) > 0)
    keep = torch.zeros(b, h * n, dtype=torch.bool, device=scores.device).scatter(1, order, chosen)
    return keep.reshape(b, h, n)


def resolve_budget(value, view: LayerView) -> int:
    """A budget option (int tokens, float fraction of the tokens seen, ``None``: the memory's budget for this
    eviction, ``view.budget``) as tokens per KV head."""
    return resolve_budget_at(value, view.budget, view.seen)


def resolve_budget_at(value, budget: int, seen: int) -> int:
    """:func:`resolve_budget` from the memory's budget (``budget`` tokens) and the tokens ``seen``."""
    if value is None:
        return int(budget)
    if isinstance(value, float):
        return max(1, math.ceil(value * seen))
    return int(value)


def check_budget_option(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenmemError(f"{name} must be None, an int (tokens) or a float in (0, 1], got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise TokenmemError(f"{name}={value} must be a fraction of the tokens seen in (0, 1]")
    if isinstance(value, int) and value < 1:
        raise TokenmemError(f"{name}={value} must be >= 1 token")


# ---------------------------------------------------------------------------------------------
# What the view does not carry yet (see the note in each function)
# ---------------------------------------------------------------------------------------------
def _memory_of(view: LayerView):
    return view.memory


def budget_cap(view: LayerView) -> int | None:
    """The most tokens per KV head the memory lets this layer hold (its budget), or ``None`` when the memory has
    no budget (``view.budget`` then counts the held slots), read from ``view.memory``; a view without a memory
    takes ``view.budget`` as the cap."""
    memory = _memory_of(view)
    if memory is not None and getattr(memory, "budget", 0) is None:
        return None
    return int(view.budget)


def rope_frequencies(view: LayerView) -> torch.Tensor | None:
    """The model's rotary ``inv_freq`` (``None`` without RoPE or for a memory driven by hand).

    Read from the memory's model context (``view.memory``)."""
    memory = _memory_of(view)
    context = getattr(memory, "context", None)
    return None if context is None else context.inv_freq


def layer_count(view: LayerView, given: int | None = None) -> int:
    """The number of layers of the memory's model: ``given``, or from the memory (``view.memory``)."""
    return memory_layer_count(_memory_of(view), given)


def memory_layer_count(memory, given: int | None = None) -> int:
    """:func:`layer_count` from the memory itself (an evictor's :meth:`~tokenmem.Evictor.layer_budget`)."""
    if given is not None:
        return given
    context = getattr(memory, "context", None)
    count = max(getattr(context, "num_layers", 0) or 0, len(getattr(memory, "layers", []) or []))
    if count < 1:
        raise TokenmemError("cannot tell how many layers the model has: pass num_layers= to the evictor")
    return count


def unrotate(keys: torch.Tensor, rope: torch.Tensor, inv_freq: torch.Tensor | None) -> torch.Tensor:
    """Keys ``[b, h, n, d]`` rotated at positions ``rope [b, h, n]`` brought back to position 0 (no-op without
    RoPE), so that keys of the same content at different positions compare equal."""
    if inv_freq is None:
        return keys
    return rotate_by(keys, -rope, inv_freq)


def mean_rotation(start: torch.Tensor, count: int, inv_freq: torch.Tensor, dim: int) -> torch.Tensor:
    """``[..., dim, dim]`` float64: the mean of the RoPE rotations at positions ``start .. start + count - 1``
    (``start [...]``), in the half-split (``rotate_half``) layout of Llama / Mistral / Qwen2, where ``R(p) x``
    equals :func:`tokenmem.rope.rotate_by` of ``x`` by ``p``. Channels past ``2 * len(inv_freq)`` stay put."""
    half = inv_freq.shape[0]
    offsets = torch.arange(count, device=start.device, dtype=torch.float64)
    angle = (start.to(torch.float64)[..., None, None] + offsets[:, None]) * inv_freq.to(start.device, torch.float64)
    cos, sin = angle.cos().mean(-2), angle.sin().mean(-2)  # [..., half]
    R = torch.eye(dim, dtype=torch.float64, device=start.device).expand(*start.shape, dim, dim).clone()
    idx = torch.arange(half, device=start.device)
    R[..., idx, idx] = cos
    R[..., idx + half, idx + half] = cos
    R[..., idx, idx + half] = -sin
    R[..., idx + half, idx] = sin
    return R


# ---------------------------------------------------------------------------------------------
# The base of the budget allocators
# ---------------------------------------------------------------------------------------------
class Allocator(Evictor):
    """An evictor that wraps any scorer (a registered name or an :class:`~tokenmem.Evictor`) and decides *how
    many* tokens each layer / head keeps, while the scorer decides *which*. It is a threshold evictor
    (``threshold = 0``): its scores are +1 on exactly the tokens its allocation keeps and -1 elsewhere, so the
    memory keeps ragged per-head counts and masks the surplus slots (see
    :meth:`tokenmem.TokenMemory.evict_layer`). Statistics, state, row window and observation are the
    scorer's. Subclasses implement :meth:`allocate`.

    ``average``: the mean tokens per layer and KV head the allocation spends. ``None`` (the default) spends the
    memory's budget ``B``: ``TokenMemory(model, "pyramid", budget=B)`` holds ``layers x B`` tokens per KV head in
    all, ``"ada"`` ``heads x B`` per layer, as a uniform evictor does, but shared unevenly (the allocator's
    :meth:`~tokenmem.Evictor.layer_budget` tells the memory each layer's share and cap). An explicit ``average``
    (int, or a float fraction of the tokens seen) is the mean instead, and the memory's budget then caps every
    layer and head (``None``: no cap; threshold evictors may run without a budget and then evict every
    ``interval`` tokens).
    """

    threshold = 0.0

    def __init__(self, scorer="snapkv", average=None, **scorer_options):
        check_budget_option("average", average)
        self.scorer = get_evictor(scorer, **scorer_options)
        if self.scorer.threshold is not None or not self.scorer.evicts:
            raise TokenmemError(f"{type(self).__name__} wraps a scoring evictor (snapkv, tova, knorm, ...); "
                                f"{self.scorer.name!r} {'decides its own counts' if self.scorer.evicts else 'never evicts'}")
        self.average = average
        self.needs_stats = self.scorer.needs_stats
        self.stats_window = self.scorer.stats_window
        self.rows_chunk = self.scorer.rows_chunk
        if hasattr(self.scorer, "default_interval"):
            self.default_interval = self.scorer.default_interval

    def state_spec(self):
        return self.scorer.state_spec()

    def observe(self, view: LayerView) -> None:
        self.scorer.observe(view)

    def check_budget(self, budget: int) -> None:
        self.scorer.check_budget(budget)

    def allocate(self, view: LayerView, scores: torch.Tensor, protect: torch.Tensor) -> torch.Tensor:
        """Bool ``[b, h, n]`` of the tokens to keep."""
        raise NotImplementedError

    def scorer_view(self, view: LayerView) -> LayerView:
        """The view the scorer sees (subclasses may give it the layer's own budget)."""
        return view

    def cap(self, view: LayerView) -> int | None:
        """The most one layer and head may hold by the memory's budget: none when the memory's budget is the mean
        (``average`` is None) or the memory has no budget, else the memory's budget (:func:`budget_cap`)."""
        return None if self.average is None else budget_cap(view)

    def _inner(self, view: LayerView):
        b, h, n = view.meta.position.shape
        inner = self.scorer_view(view)
        scores = torch.as_tensor(self.scorer.score(inner)).float().expand(b, h, n)
        protect = self.scorer.protect(inner)
        protect = view.meta.is_protected if protect is None else (protect | view.meta.is_protected)
        return scores, protect.expand(b, h, n) & view.meta.valid

    def score(self, view: LayerView) -> torch.Tensor:
        scores, protect = self._inner(view)
        return allocation_scores(self.allocate(view, scores, protect))

    def protect(self, view: LayerView) -> torch.Tensor | None:
        return self.scorer.protect(self.scorer_view(view))


def replace_budget(view: LayerView, budget: int) -> LayerView:
    """The same view with another ``budget`` (the scorer of an allocator sees its layer's budget)."""
    return dataclasses.replace(view, budget=int(budget))
