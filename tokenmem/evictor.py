"""The Evictor protocol, the view of one layer it reads, and the registry of evictors by name.

An evictor scores the tokens of one layer (``score -> [batch, kv_heads, tokens]``, higher keeps) and
marks the ones that must stay (``protect``). Budget enforcement is the memory's job: it keeps the
protected tokens plus the best-scored ones up to the budget. An evictor may keep per-token state
(declared by :meth:`Evictor.state_spec`), which the memory stores and compacts together with the tokens.
An evictor never touches another layer's tensors and never allocates ``tokens x tokens``.

What an evictor needs from the memory it declares as class attributes (``needs_separators``,
``needs_stats``, ``stats_window`` / ``rows_chunk``, ``default_interval``, ``threshold``, ``evicts``,
:meth:`~Evictor.state_spec`); the memory reads those and never the evictor's name.

The registry maps names to factories. The built-in evictors (``tokenmem.plugins``) are registered by the
package itself (``tokenmem/__init__.py`` imports them), not by this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import BudgetError, TokenmemError, UnknownEvictorError
from .meta import TokenMeta


@dataclass
class LayerView:
    """What an evictor sees of one layer at eviction (or observation) time. All token tensors are
    ``[batch, kv_heads, tokens, ...]`` and ordered by stream position."""

    layer: int
    keys: torch.Tensor  # [b, h, n, d]
    values: torch.Tensor  # [b, h, n, dv]
    meta: TokenMeta  # fields [b, h, n]
    state: dict[str, torch.Tensor]  # evictor state, [b, h, n, ...]
    mass: torch.Tensor | None  # attention mass each key received in the latest call, [b, h, n] float32
    seen: int  # tokens seen by this layer so far
    budget: int  # the memory's budget for this eviction, tokens per (batch, head) (layers: Evictor.layer_budget)
    new_tokens: int  # tokens appended by the latest call
    rows: torch.Tensor | None = None  # [b, h, r, n] float32: attention rows of the newest r queries (oldest first)
    rows_window: object = field(default=None, repr=False)  # where consume_rows reports (the layer or a scratch)
    memory: object = field(default=None, repr=False)  # the TokenMemory (its budget, model context, layer count)

    @property
    def extras(self) -> dict:
        """Deprecated, always empty (kept so that evictors written against it still run): what an evictor
        needs is declared on the evictor (``needs_stats``, ``stats_window``, ...) and arrives in the fields."""
        return {}

    def consume_rows(self, count: int) -> None:
        """Tell the memory the ``count`` oldest rows in :attr:`rows` are folded into the evictor's state."""
        self.rows_window.consume_rows(count)

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    def slot_index(self) -> torch.Tensor:
        """``[1, 1, n]`` index of each cache slot (0 = oldest held)."""
        return torch.arange(self.num_tokens, device=self.keys.device)[None, None, :]

    def newest(self, count: int) -> torch.Tensor:
        """Bool ``[1, 1, n]``: the ``count`` most recent slots. Left padding never reaches them, but slots
        masked by a ragged threshold eviction may (the memory never keeps a masked slot on that account)."""
        return self.slot_index() >= self.num_tokens - count

    def first_valid(self, count: int) -> torch.Tensor:
        """Bool ``[b, h, n]``: the first ``count`` non-padding tokens of each row (attention sinks)."""
        valid = self.meta.valid
        rank = torch.cumsum(valid.to(torch.int32), dim=-1)
        return valid & (rank <= count)


DEFAULT_INTERVAL = 64  # new tokens between evictions during decoding, unless the evictor declares another


class Evictor:
    """Base class of evictors. Subclasses set ``name``/``description`` and implement :meth:`score`.

    The class attributes below declare what the evictor needs; the memory reads them (and nothing else:
    an evictor's ``name`` is for people and the registry only)."""

    name: str = "evictor"
    description: str = ""
    #: True when the evictor reads the ``separator`` flag (SepLLM): the memory must know the separator token
    #: ids (``separator_ids=``, ``tokenizer=``, or the tokenizer saved beside a local model) and flags them.
    needs_separators: bool = False
    #: New tokens between evictions during decoding when ``TokenMemory(interval=None)``.
    default_interval: int = DEFAULT_INTERVAL
    #: False for evictors that never remove anything (``full``): the memory skips eviction.
    evicts: bool = True
    #: True when :meth:`observe` needs the per-key attention mass from the statistics attention.
    needs_stats: bool = False
    #: When set, the evictor decides counts itself: every ``interval`` tokens the memory keeps the tokens
    #: scoring ``>= threshold`` (plus protected ones; the budget, if any, caps the count by top score).
    #: Heads and rows may keep different counts; see :meth:`tokenmem.TokenMemory.evict_layer`.
    threshold: float | None = None
    #: > 0 when the evictor reads the attention rows of the queries (``view.rows``, GQA: mean over each
    #: KV head's query group): the memory keeps up to this many rows not yet consumed, calls
    #: :meth:`observe` whenever the window fills (splitting long calls), and the evictor consumes rows
    #: with ``view.consume_rows(k)``. Every query's row reaches the evictor exactly once.
    stats_window: int = 0
    #: > 0 (with ``stats_window``): a call longer than the free part of the rows window is processed in
    #: sub-chunks of up to this many queries, and :meth:`observe` sees the unconsumed rows plus a whole
    #: sub-chunk's rows at once (``view.rows`` may then hold more than ``stats_window`` rows); the newest
    #: rows it leaves, at most ``stats_window``, stay for the next call. 0: sub-chunks fill the window.
    rows_chunk: int = 0

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-token state the memory must store for this evictor: name -> (trailing shape, dtype)."""
        return {}

    def check_budget(self, budget: int) -> None:
        """Raise :class:`BudgetError` when ``budget`` tokens cannot hold what this evictor protects."""

    def layer_budget(self, budget: int, layer: int, memory) -> tuple[int, int]:
        """How layer ``layer`` spends the memory's budget, ``budget`` tokens per layer and KV head (a fractional
        budget already resolved for the tokens seen): ``(spend, cap)``. The memory evicts the layer when it holds
        more than ``spend`` slots per (batch row, KV head) (after a multi-token call, or every ``interval`` new
        tokens), and an eviction keeps at most ``cap`` tokens per (row, KV head).

        The default, ``(budget, budget)``, holds every layer and head at the budget. Budget allocators override
        it to spend the same total differently: PyramidKV (``pyramid``) gives each layer its own share of
        ``layers x budget``, AdaKV (``ada``) lets one head take more of its layer's ``heads x budget`` than
        another (a threshold evictor whose own scores then decide each head's count). ``memory`` is the
        :class:`~tokenmem.TokenMemory` (its layer count, its layers' tokens seen and buffers); ``view.budget``
        stays the memory's budget."""
        return budget, budget

    def observe(self, view: LayerView) -> None:
        """Update per-token state after an attention call (e.g. accumulate attention mass).

        Called only for evictors that read statistics: ``needs_stats`` (after every call, with
        ``view.mass``) or ``stats_window > 0`` (whenever the row window fills, with ``view.rows``)."""

    def score(self, view: LayerView) -> torch.Tensor:
        """Scores broadcastable to ``[batch, kv_heads, tokens]``; higher keeps."""
        raise NotImplementedError

    def protect(self, view: LayerView) -> torch.Tensor | None:
        """Bool mask broadcastable to ``[batch, kv_heads, tokens]`` of tokens that must be kept."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    factory: Callable[..., Evictor]
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_evictor(name: str, description: str | None = None):
    """Class decorator (or call with a factory) registering an evictor under ``name``."""

    def wrap(factory):
        desc = description if description is not None else getattr(factory, "description", "")
        _REGISTRY[name] = _Entry(factory=factory, description=desc)
        return factory

    return wrap


def list_evictors() -> dict[str, str]:
    """Registered evictor names with their one-line descriptions."""
    return {name: entry.description for name, entry in sorted(_REGISTRY.items())}


def check_evictor(evictor) -> None:
    """Raise when ``evictor`` is neither a registered name nor an :class:`Evictor` (nothing is built)."""
    if isinstance(evictor, Evictor):
        return
    if not isinstance(evictor, str):
        raise TokenmemError(
            f"evictor must be a registered name or an Evictor object, got {type(evictor).__name__}"
        )
    if evictor not in _REGISTRY:
        raise UnknownEvictorError(
            f"unknown evictor {evictor!r}; registered evictors: {', '.join(sorted(_REGISTRY))} "
            "(`tokenmem evictors` lists them; register your own with tokenmem.register_evictor)"
        )


def get_evictor(evictor: str | Evictor, **kwargs) -> Evictor:
    """An Evictor object from a registered name (``kwargs`` go to its constructor) or an Evictor itself."""
    if isinstance(evictor, Evictor):
        if kwargs:
            raise TokenmemError("evictor options can only be given with an evictor name, not with an Evictor object")
        return evictor
    check_evictor(evictor)
    try:
        return _REGISTRY[evictor].factory(**kwargs)
    except TypeError as exc:
        raise TokenmemError(f"bad options for evictor {evictor!r}: {exc}") from exc


def check_positive_count(name: str, value: int | float, *, allow_fraction: bool = True) -> None:
    """Validate an evictor option that is a token count (int >= 0) or a fraction of the budget."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(f"{name} must be an int or a float, got {value!r}")
    if isinstance(value, float):
        if not allow_fraction or not 0.0 <= value <= 1.0:
            raise BudgetError(f"{name}={value} must be a fraction of the budget in [0, 1] or a token count")
    elif value < 0:
        raise BudgetError(f"{name}={value} must be >= 0")


def resolve_count(value: int | float, budget: int) -> int:
    """A count option: ints as they are, floats as a fraction of the budget."""
    return int(value * budget) if isinstance(value, float) else int(value)
