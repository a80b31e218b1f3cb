"""MemoryConfig: the validated settings of a :class:`~tokenmem.TokenMemory`.

``TokenMemory(model, config=MemoryConfig(...))`` and ``TokenMemory(model, "sink", budget=256, ...)`` are
the same memory: the keyword form builds the config. A config holds an evictor *name* (and its options)
or an Evictor object; every memory made from a name builds its own evictor, so one config can make many
independent memories.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from .errors import BudgetError, TokenmemError
from .evictor import Evictor, check_evictor, get_evictor

POSITION_MODES = ("original", "shift")
EVICT_UNITS = ("token", "segment")


def validate_budget(budget) -> int | float | None:
    """A budget is None (keep all), an int >= 1 (tokens per layer and KV head) or a float in (0, 1]."""
    if budget is None:
        return None
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        budget = int(budget)  # numpy integers too
    elif isinstance(budget, numbers.Real) and not isinstance(budget, bool):
        budget = float(budget)
    else:
        raise BudgetError(
            f"budget must be an int (tokens per layer and KV head) or a float in (0, 1] (fraction of tokens seen), "
            f"got {budget!r} ({type(budget).__name__}); e.g. budget=256 or budget=0.25"
        )
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise BudgetError(
                f"a float budget is a fraction of the tokens seen and must lie in (0, 1], got {budget}; "
                "pass an int for a token count (e.g. budget=256)"
            )
        return budget
    if budget <= 0:
        raise BudgetError(f"budget must be a positive number of tokens, got {budget}; e.g. budget=256 or budget=0.25")
    return int(budget)


def validate_interval(interval) -> int:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise TokenmemError(f"interval must be a positive int (new tokens between evictions), got {interval!r}")
    return interval


@dataclass
class MemoryConfig:
    """Settings of a TokenMemory (see :class:`~tokenmem.TokenMemory` for what each one does).

    Args:
        evictor: a registered evictor name or an :class:`~tokenmem.Evictor` object.
        budget: tokens per layer and KV head (int >= 1), a fraction of the tokens seen (float in (0, 1]) or None.
        interval: new tokens between evictions while decoding; None: the evictor's ``default_interval``.
        positions: ``"original"`` or ``"shift"``.
        evict_unit: ``"token"`` or ``"segment"``.
        record_stats: always compute the per-key attention mass.
        bank: None/False, True or a :class:`tokenmem.bank.Bank` (the memory bank's options).
        separator_ids: the separator token ids (for evictors that declare ``needs_separators``).
        decode_span: calls of at most this many new tokens count as decode steps (evict every ``interval``).
        evictor_options: passed to the evictor's constructor when ``evictor`` is a name.
    """

    evictor: str | Evictor = "full"
    budget: int | float | None = None
    interval: int | None = None
    positions: str = "original"
    evict_unit: str = "token"
    record_stats: bool = False
    bank: object = None
    separator_ids: object = None
    decode_span: int = 1
    evictor_options: dict = field(default_factory=dict)

    def __post_init__(self):
        check_evictor(self.evictor)
        if isinstance(self.evictor, Evictor) and self.evictor_options:
            raise TokenmemError("evictor options can only be given with an evictor name, not with an Evictor object")
        self.budget = validate_budget(self.budget)
        if self.interval is not None:
            validate_interval(self.interval)
        if isinstance(self.decode_span, bool) or not isinstance(self.decode_span, int) or self.decode_span < 1:
            raise TokenmemError(f"decode_span must be a positive int (the longest call that counts as a decode step), "
                                f"got {self.decode_span!r}")
        if self.positions not in POSITION_MODES:
            raise TokenmemError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if self.evict_unit not in EVICT_UNITS:
            raise TokenmemError(
                f"evict_unit must be one of {EVICT_UNITS}, got {self.evict_unit!r}; 'segment' keeps or drops all "
                "tokens of a segment (a video frame, a timestep) together"
            )
        if self.separator_ids is not None:
            try:
                self.separator_ids = torch.as_tensor(sorted(set(int(i) for i in self.separator_ids)),
                                                     dtype=torch.long)
            except (TypeError, ValueError) as exc:
                raise TokenmemError(f"separator_ids must be token ids (ints), got {self.separator_ids!r}") from exc

    def make_evictor(self) -> Evictor:
        """The evictor of a new memory (built from the name, or the object itself), checked against the budget."""
        evictor = get_evictor(self.evictor, **self.evictor_options)
        if evictor.evicts and self.budget is None and evictor.threshold is None:
            raise BudgetError(
                f"evictor {evictor.name!r} needs a budget: pass budget=<tokens> (e.g. 256) or a fraction "
                "(e.g. 0.25); use evictor='full' to keep everything"
            )
        if isinstance(self.budget, int) and evictor.evicts:
            evictor.check_budget(self.budget)
        return evictor

    def interval_for(self, evictor: Evictor) -> int:
        """New tokens between evictions: the configured interval or the evictor's default."""
        return validate_interval(evictor.default_interval if self.interval is None else self.interval)
