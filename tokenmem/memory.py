"""TokenMemory: a ``transformers`` Cache with a budget, an evictor and per-token metadata.

Each layer stores keys, values, packed :class:`~tokenmem.meta.TokenMeta` and the evictor's per-token
state in growable buffers ``[batch, kv_heads, capacity, ...]``; the first ``held`` slots are live and
ordered by stream position. The ``"tokenmem"`` attention function (see :mod:`tokenmem.attention`)
computes each layer's attention from these buffers, records the attention statistics, and then lets
the memory evict: every ``interval`` new tokens, and at the end of every multi-token (prefill) call,
when the layer holds more than its budget. Eviction keeps the protected tokens plus the best-scored
ones, per batch row and KV head, and compacts everything in one gather.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache

from . import kernels
from .attention import ModelContext, prepare_model
from .layer import CROP_ERROR, MemoryLayer, select_kept, whole_segments
from .errors import BudgetError, MemoryStateError, TokenmemError
from .evictor import Evictor, LayerView, get_evictor
from .meta import FIELDS, FLAGS, PAD, POSITION, ROPE, SEPARATOR, TOKEN, TokenMeta
from .rope import rotate_by

POSITION_MODES = ("original", "shift")
EVICT_UNITS = ("token", "segment")
DEFAULT_INTERVAL = 64


def validate_budget(budget) -> int | float | None:
    """A budget is None (keep all), an int >= 1 (tokens per layer and KV head) or a float in (0, 1]."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(
            f"budget must be an int (tokens per layer and KV head) or a float in (0, 1] (fraction of tokens seen), "
            f"got {budget!r}"
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


class TokenMemory(Cache):
    """A bounded, evicting KV cache for ``transformers`` models.

    Args:
        model: the model to prepare (its language attention is switched to ``"tokenmem"``); ``None`` for a
            memory driven by hand (no model preparation, ``num_layers`` then grows lazily).
        evictor: a registered evictor name (see ``tokenmem evictors``) or an :class:`~tokenmem.Evictor`.
        budget: tokens kept per layer and KV head (int), or a fraction of the tokens seen (float in (0, 1]);
            ``None`` keeps everything.
        interval: new tokens between evictions during decoding (default: the evictor's ``default_interval``,
            64 for the classic evictors, 512 for NAMM); multi-token calls (prefill chunks)
            always end with an eviction when over budget. Held tokens never exceed ``budget + interval``
            after a decode step.
        positions: ``"original"`` (new tokens continue counting from the tokens seen) or ``"shift"``
            (positions inside the cache; kept keys are re-rotated for RoPE models, ignored without RoPE).
        tokenizer / separator_ids: where separator tokens come from (needed by the ``separator`` evictor);
            by default the tokenizer saved beside a local model is used when one exists.
        record_stats: always compute the per-key attention mass (``layer.mass``), even when the evictor
            does not need it.
        evict_unit: ``"token"`` (each token kept or dropped on its own) or ``"segment"`` (all tokens of a
            segment -- a video frame, a timestep -- kept or dropped together, scored by the mean of their
            scores; text tokens and tokens with segment -1 stay per token; see :func:`whole_segments`).
        bank: ``True`` or a :class:`tokenmem.plugins.bank.Bank`: evicted tokens go to a MemLong-style memory bank
            (host memory or disk) and the best-matching chunks are retrieved back into attention
            (:mod:`tokenmem.plugins.bank`); ``memory.bank`` is the runtime bank. ``None``/``False``: no bank.
        evictor_options: passed to the evictor's constructor when ``evictor`` is a name.
    """

    def __init__(
        self,
        model=None,
        evictor: str | Evictor = "full",
        budget: int | float | None = None,
        interval: int | None = None,
        positions: str = "original",
        *,
        tokenizer=None,
        separator_ids=None,
        record_stats: bool = False,
        evict_unit: str = "token",
        bank=None,
        **evictor_options,
    ):
        self.evictor = get_evictor(evictor, **evictor_options)
        self.budget = validate_budget(budget)
        if self.evictor.evicts and self.budget is None and self.evictor.threshold is None:
            raise BudgetError(
                f"evictor {self.evictor.name!r} needs a budget: pass budget=<tokens> (e.g. 256) or a fraction "
                "(e.g. 0.25); use evictor='full' to keep everything"
            )
        if interval is None:
            interval = getattr(self.evictor, "default_interval", DEFAULT_INTERVAL)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise TokenmemError(f"interval must be a positive int (new tokens between evictions), got {interval!r}")
        if positions not in POSITION_MODES:
            raise TokenmemError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if evict_unit not in EVICT_UNITS:
            raise TokenmemError(
                f"evict_unit must be one of {EVICT_UNITS}, got {evict_unit!r}; 'segment' keeps or drops all tokens "
                "of a segment (a video frame, a timestep) together"
            )
        self.evict_unit = evict_unit
        if isinstance(self.budget, int) and self.evictor.evicts:
            self.evictor.check_budget(self.budget)
        self.interval = interval
        self.positions = positions
        self.record_stats = record_stats
        self.context: ModelContext | None = None
        if model is not None:
            tokenizer_problem = None
            if separator_ids is None and tokenizer is None and self.evictor.name == "separator":
                tokenizer, tokenizer_problem = _local_tokenizer(model)
            if tokenizer is not None and separator_ids is None:
                from tokenmem.adapters.text import separator_ids as find_separators

                separator_ids = find_separators(tokenizer)
            self.context = prepare_model(model, separator_ids=separator_ids)
            num_layers = self.context.num_layers
        else:
            num_layers = 0
            self.context = ModelContext(num_layers=0, previous_attn=None)
            if separator_ids is not None:
                self.context.separator_ids = torch.as_tensor(sorted(set(separator_ids)), dtype=torch.long)
        if self.evictor.name == "separator" and self.context.separator_ids is None:
            why = f" (the tokenizer beside the model could not be loaded: {tokenizer_problem})" if model is not None and tokenizer_problem else ""
            raise TokenmemError(
                "the separator evictor needs to know the separator tokens: pass tokenizer=<the model's tokenizer> "
                f"or separator_ids=[...] to TokenMemory{why}"
            )
        self._annotation: TokenMeta | None = None
        self._chunk: tuple | None = None
        self.has_padding = False
        super().__init__(layers=[MemoryLayer(self, i) for i in range(num_layers)])
        self.bank = None
        if bank is not None and bank is not False:  # the memory bank (plugins/bank.py)
            from tokenmem.plugins.bank import make_bank

            self.bank = make_bank(bank, self)

    # -- Cache API --------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(MemoryLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self._annotation = None
        self._chunk = None
        self.has_padding = False
        if self.bank is not None:
            self.bank.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise MemoryStateError(CROP_ERROR)

    # -- public helpers ---------------------------------------------------------------------------
    @property
    def seen(self) -> int:
        return self.layers[0].seen if self.layers else 0

    def budget_tokens(self, seen: int | None = None) -> int | None:
        """The number of tokens per layer and KV head the budget allows after ``seen`` tokens."""
        if self.budget is None:
            return None
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * (self.seen if seen is None else seen)))
        return self.budget

    def annotate(self, meta: TokenMeta) -> None:
        """Metadata (modality, segment, flags, token) for the tokens of the next forward call, ``[batch, tokens]``
        fields; adapters call this. Positions and padding are always filled in by the memory. An annotated
        ``token`` >= 0 is stored as given; -1 lets the memory record the input id (the video adapter stores
        each frame token's index within its frame there, since every video token has the same input id)."""
        self._annotation = meta

    def stats(self) -> dict:
        """Tokens seen, held per layer, bytes allocated (all buffers), bytes of held keys/values, evictions;
        with a memory bank, ``"bank"``: its chunks, bytes (host, spilled, retrieved on the device) and drops."""
        held = [layer.held for layer in self.layers]
        kv_bytes = 0
        total = 0
        for layer in self.layers:
            if layer._k is not None:
                kv_bytes += layer.keys.numel() * layer._k.element_size() + layer.values.numel() * layer._v.element_size()
                total += sum(t.numel() * t.element_size() for t in layer.buffers())
        seen = self.seen
        bank = {} if self.bank is None else {"bank": self.bank.stats()}
        return {
            "seen": seen,
            "held": held,
            "held_fraction": (sum(held) / (len(held) * seen)) if seen and held else 1.0,
            "budget": self.budget_tokens(),
            "bytes": total,
            "kv_bytes": kv_bytes,
            "evictions": sum(layer.evictions for layer in self.layers),
            "evictor": self.evictor.name,
            "positions": self.positions,
            **bank,
        }

    def summary(self) -> str:
        """A one-line, human-readable memory summary."""
        s = self.stats()
        held = s["held"]
        held_txt = f"{min(held)}" if held and min(held) == max(held) else f"{min(held or [0])}-{max(held or [0])}"
        budget = "all" if s["budget"] is None else s["budget"]
        return (
            f"memory: evictor={s['evictor']} budget={budget} seen={s['seen']} held/layer={held_txt} "
            f"({100 * s['held_fraction']:.1f}% of seen) kv={s['kv_bytes'] / 2**20:.2f} MiB "
            f"allocated={s['bytes'] / 2**20:.2f} MiB evictions={s['evictions']}"
        )

    def __repr__(self) -> str:
        unit = "" if self.evict_unit == "token" else f", evict_unit={self.evict_unit!r}"
        return (f"TokenMemory(evictor={self.evictor!r}, budget={self.budget}, interval={self.interval}, "
                f"positions={self.positions!r}{unit})")

    # -- the attention path (called by tokenmem.attention) -----------------------------------------
    def _chunk_meta(self, layer: MemoryLayer, q: int, mask2d, position_ids, device) -> torch.Tensor:
        """Packed metadata ``[b, 1, q, FIELDS]`` of the tokens just appended (computed once per forward)."""
        start = layer.seen - q
        b = layer._k.shape[0]
        if self._chunk is not None and self._chunk[0] == (start, q, b):
            return self._chunk[1]
        meta = torch.zeros(b, q, FIELDS, dtype=torch.long, device=device)
        meta[..., POSITION] = torch.arange(start, start + q, device=device)
        if self._annotation is not None:
            ann = self._annotation
            if tuple(ann.position.shape) != (b, q):
                raise TokenmemError(
                    f"memory.annotate() got metadata for {tuple(ann.position.shape)} tokens but the forward call "
                    f"appends {b} x {q}; annotate exactly the tokens of the next call"
                )
            packed = ann.pack().to(device)
            for col in (2, 3, FLAGS):  # modality, segment, flags
                meta[..., col] = packed[..., col]
            tok = packed[..., TOKEN]
            meta[..., TOKEN] = tok
            self._annotation = None
        else:
            meta[..., TOKEN] = -1
        ids = self.context.last_input_ids if self.context is not None else None
        if ids is not None and tuple(ids.shape) == (b, q):
            ids = ids.to(device)
            meta[..., TOKEN] = torch.where(meta[..., TOKEN] >= 0, meta[..., TOKEN], ids)  # annotated values win
            if self.context.separator_ids is not None:
                is_sep = torch.isin(ids, self.context.separator_ids.to(device))
                meta[..., FLAGS] |= is_sep.long() * SEPARATOR
        if self.context is not None:
            self.context.last_input_ids = None
        if mask2d is not None:
            pad = ~mask2d[:, -q:].to(device=device, dtype=torch.bool)
            if bool(pad.any()):
                self.has_padding = True
                meta[..., FLAGS] |= pad.long() * PAD
        if position_ids is not None and position_ids.shape[-1] == q:
            meta[..., ROPE] = position_ids.to(device).reshape(-1, q).expand(b, q)
        else:
            meta[..., ROPE] = meta[..., POSITION]
        chunk = meta[:, None]  # [b, 1, q, F]
        self._chunk = ((start, q, b), chunk)
        return chunk

    def _attend(self, layer_idx, query, mask2d, position_ids, *, scaling, causal, dropout):
        layer = self.layers[layer_idx]
        q = query.shape[2]
        if layer.pending != q:
            raise TokenmemError(
                f"layer {layer_idx}: the attention call has {q} queries but the memory just received {layer.pending} "
                "keys; the model must call past_key_values.update() right before attention"
            )
        n = layer.held
        chunk = self._chunk_meta(layer, q, mask2d, position_ids, query.device)
        layer._meta[:, :, n - q : n] = chunk
        layer.pending = 0
        if self.positions == "shift" and self.context.inv_freq is not None:
            query = self._shift_new_tokens(layer, query, q)
        key_valid = query_valid = None
        if self.has_padding:
            key_valid = (layer._meta[:, :, :n, FLAGS] & PAD) == 0  # [b, h, n]
            query_valid = (chunk[:, 0, :, FLAGS] & PAD) == 0  # [b, q]
        need_mass = self.record_stats or self.evictor.needs_stats or (self.bank is not None and self.bank.needs_mass)
        extra = None if self.bank is None else self.bank.retrieve(layer, query, query_valid)  # banked tokens
        if layer.rows is not None and self.evictor.rows_chunk and q > layer.rows.shape[2] - layer.row_count:
            out = self._attend_with_row_chunks(layer, query, q, scaling, causal, key_valid, query_valid, need_mass,
                                               dropout, extra)
        elif layer.rows is None:
            out, mass = self._kernel(
                extra, query, layer.keys, layer.values, scaling=scaling, causal=causal,
                key_valid=key_valid, query_valid=query_valid, need_mass=need_mass, dropout=dropout,
            )
            layer.mass = mass
            if self.evictor.needs_stats:
                self.evictor.observe(self._view(layer, self.budget_tokens(layer.seen) or n, q))
        else:
            out = self._attend_with_rows(layer, query, q, scaling, causal, key_valid, query_valid, need_mass, dropout,
                                         extra)
        if self.bank is not None:
            self.bank.observe(layer)
        self._maybe_evict(layer, q)
        return out

    @staticmethod
    def _kernel(extra, query, keys, values, **kwargs):
        """:func:`kernels.attention_with_stats`; with ``extra`` (tokens retrieved from the memory bank) their keys
        are prepended to ``keys`` and the statistics still cover ``keys`` only (see ``Retrieved.attend``)."""
        if extra is None:
            return kernels.attention_with_stats(query, keys, values, **kwargs)
        return extra.attend(query, keys, values, **kwargs)

    def _attend_with_rows(self, layer, query, q, scaling, causal, key_valid, query_valid, need_mass, dropout,
                          extra=None):
        """Attention for evictors that read attention rows (``stats_window`` > 0): the call's queries are
        processed in sub-chunks that fill the rows window exactly, and the evictor observes (and may
        consume) the rows after each sub-chunk, so every query's row reaches it whatever the call size."""
        n, w = layer.held, layer.rows.shape[2]
        outs = []
        mass = torch.zeros(layer._k.shape[0], layer._k.shape[1], n, device=query.device) if need_mass else None
        if layer.row_count:  # earlier queries did not see the keys appended by this call
            layer.rows[:, :, : layer.row_count, n - q : n] = 0
        s = 0
        while s < q:
            if layer.row_count == w:  # rows nobody consumed: a sliding window of the newest w queries
                layer.consume_rows(min(w, q - s))
            c = min(q - s, w - layer.row_count)
            limit = n - q + s + c  # keys visible to this sub-chunk (causal by slot)
            rows = layer.rows[:, :, layer.row_count : layer.row_count + c, :limit]
            layer.rows[:, :, layer.row_count : layer.row_count + c, limit:n] = 0
            out, part = self._kernel(
                extra, query[:, :, s : s + c], layer._k[:, :, :limit], layer._v[:, :, :limit], scaling=scaling,
                causal=causal, key_valid=None if key_valid is None else key_valid[..., :limit],
                query_valid=None if query_valid is None else query_valid[:, s : s + c],
                need_mass=need_mass, rows=rows, dropout=dropout,
            )
            outs.append(out)
            if mass is not None:
                mass[..., :limit] += part
            layer.row_count += c
            layer.mass = mass
            self.evictor.observe(self._view(layer, self.budget_tokens(layer.seen) or n, c))
            s += c
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _attend_with_row_chunks(self, layer, query, q, scaling, causal, key_valid, query_valid, need_mass, dropout,
                                extra=None):
        """Attention for a call longer than the free part of the rows window, for evictors that set
        ``rows_chunk``: the queries go in sub-chunks of up to ``rows_chunk``, one kernel call each, whose rows
        land in a scratch buffer behind the rows not yet consumed; the evictor observes them all at once, and
        the newest rows it leaves (at most the window) return to the layer's window. Every query's row
        reaches the evictor exactly once, as in :meth:`_attend_with_rows`, with far fewer kernel calls and
        observations, while the layer keeps only ``stats_window`` rows between calls."""
        n, w = layer.held, layer.rows.shape[2]
        b, h = layer._k.shape[:2]
        step = self.evictor.rows_chunk
        outs = []
        mass = torch.zeros(b, h, n, device=query.device) if need_mass else None
        if layer.row_count:  # earlier queries did not see the keys appended by this call
            layer.rows[:, :, : layer.row_count, n - q : n] = 0
        s = 0
        while s < q:
            c = min(q - s, step)
            r = layer.row_count
            limit = n - q + s + c  # keys visible to this sub-chunk (causal by slot)
            scratch = torch.empty(b, h, r + c, n, dtype=torch.float32, device=query.device)  # [b, h, r + c, n]
            if r:
                scratch[:, :, :r] = layer.rows[:, :, :r, :n]
            if limit < n:
                scratch[:, :, r:, limit:] = 0
            out, part = self._kernel(
                extra, query[:, :, s : s + c], layer._k[:, :, :limit], layer._v[:, :, :limit], scaling=scaling,
                causal=causal, key_valid=None if key_valid is None else key_valid[..., :limit],
                query_valid=None if query_valid is None else query_valid[:, s : s + c],
                need_mass=need_mass, rows=scratch[:, :, r:, :limit], dropout=dropout,
            )
            outs.append(out)
            if mass is not None:
                mass[..., :limit] += part
            layer.mass = mass
            window = _ScratchRows(scratch)
            view = self._view(layer, self.budget_tokens(layer.seen) or n, c)
            view.rows, view._layer = scratch, window
            self.evictor.observe(view)
            left = min(r + c - window.consumed, w)  # the newest unconsumed rows, at most the window
            layer.rows[:, :, :left, :n] = scratch[:, :, r + c - left :]
            layer.row_count = left
            s += c
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _shift_new_tokens(self, layer: MemoryLayer, query: torch.Tensor, q: int) -> torch.Tensor:
        """``shift`` mode: new tokens take the cache slots' positions; rotate their keys and queries."""
        delta = self._rotate_to_slots(layer, layer.held - q)
        if delta is not None:  # queries share their tokens' positions: the delta of the first KV head
            query = rotate_by(query, delta[:, :1], self.context.inv_freq)
        return query

    def _rotate_to_slots(self, layer: MemoryLayer, start: int) -> torch.Tensor | None:
        """Re-rotate the keys in slots ``start..held-1`` to positions equal to their slots; returns the
        rotation ``[b, h, held - start]`` applied, or None when every key was already in place."""
        n = layer.held
        rope = layer._meta[:, :, start:n, ROPE]  # positions the keys are rotated at now
        target = torch.arange(start, n, device=rope.device)
        delta = target - rope
        if not bool((delta != 0).any()):
            return None
        layer._k[:, :, start:n] = rotate_by(layer._k[:, :, start:n], delta, self.context.inv_freq)
        layer._meta[:, :, start:n, ROPE] = target
        return delta

    def _view(self, layer: MemoryLayer, budget: int, new_tokens: int) -> LayerView:
        return LayerView(
            layer=layer.index,
            keys=layer.keys,
            values=layer.values,
            meta=layer.meta,
            state=layer.token_state,
            mass=layer.mass,
            rows=layer.recent_rows,
            _layer=layer,
            seen=layer.seen,
            budget=budget,
            new_tokens=new_tokens,
        )

    def _maybe_evict(self, layer: MemoryLayer, q: int) -> None:
        if not self.evictor.evicts:
            return
        keep = self.budget_tokens(layer.seen)
        if self.evictor.threshold is not None:  # the evictor sets the count: update every interval tokens
            over_budget = keep is not None and layer.held > keep and q > 1
            if layer.since_evict >= self.interval or over_budget:
                self.evict_layer(layer, keep)
            return
        if layer.held <= keep or not (layer.since_evict >= self.interval or q > 1):
            return
        self.evict_layer(layer, keep)

    def evict_layer(self, layer: MemoryLayer, keep: int | None) -> None:
        """Evict one layer down to ``keep`` tokens per (batch row, KV head).

        Threshold evictors (``evictor.threshold`` set, e.g. NAMM) keep the tokens scoring at least the
        threshold, capped at ``keep`` when a budget is given; with ``evict_unit="segment"`` whole segments
        are kept or dropped (:func:`whole_segments`). Rows and KV heads may then want different
        counts: the memory keeps the largest count ``K`` in every row and head (tensors stay rectangular)
        and *masks* the surplus slots of the rows that wanted fewer (flag ``PAD``: never attended, and
        evicted first at the next update). Attention thus follows each head's own decision exactly.
        """
        view = self._view(layer, keep if keep is not None else layer.held, 0)
        b, h, n = view.meta.position.shape
        scores = torch.as_tensor(self.evictor.score(view)).expand(b, h, n)
        if bool(torch.isnan(scores).any()):
            raise TokenmemError(f"evictor {self.evictor.name!r} returned NaN scores on layer {layer.index}")
        valid = view.meta.valid
        protect = self.evictor.protect(view)
        protect = view.meta.is_protected if protect is None else (protect | view.meta.is_protected)
        protect = protect.expand(b, h, n) & valid
        eligible = valid
        segments = self.evict_unit == "segment"
        if segments:
            protect, eligible = whole_segments(view.meta, scores, protect, valid, keep, self.evictor.threshold)
        most = int(protect.sum(-1).max())
        if keep is not None and most > keep and isinstance(self.budget, float):
            keep = most  # a fraction of a short stream (a DT's first steps) may be less than the protected tokens
        if keep is not None and most > keep:
            whole = " (with evict_unit='segment', whole segments of protected tokens)" if segments else ""
            raise BudgetError(
                f"budget of {keep} tokens is smaller than the {most} tokens evictor {self.evictor.name!r} protects"
                f"{whole} on layer {layer.index} (after {layer.seen} tokens seen); raise the budget or protect fewer "
                "tokens"
            )
        ragged = segments or self.evictor.threshold is not None  # rows and heads may keep different counts
        if segments:
            keep = max(1, int(eligible.sum(-1).max()))
        elif self.evictor.threshold is not None:
            eligible = valid & ((scores >= self.evictor.threshold) | protect)
            count = max(1, int(eligible.sum(-1).max()))
            keep = count if keep is None else min(keep, count)
        index = select_kept(scores, protect, eligible, keep)
        kept_ok = torch.gather(eligible, 2, index) if ragged else None
        if self.bank is not None:  # the tokens leaving (or masked by a ragged decision) go to the memory bank
            self.bank.capture(layer, index, kept_ok)
        layer.compact(index)
        if kept_ok is not None and not bool(kept_ok.all()):  # ragged decisions: mask the surplus slots
            layer._meta[:, :, :keep, FLAGS] |= (~kept_ok).long() * PAD
            self.has_padding = True
        if self.positions == "shift" and self.context.inv_freq is not None:
            self._reposition(layer)
        layer.since_evict = 0
        layer.evictions += 1

    def _reposition(self, layer: MemoryLayer) -> None:
        """``shift`` mode: re-rotate the kept keys to their slot positions ``0..held-1``."""
        self._rotate_to_slots(layer, 0)


class _ScratchRows:
    """Stands in for the layer while an evictor observes scratch rows: counts the rows it consumes."""

    def __init__(self, rows: torch.Tensor):
        self.available = rows.shape[2]
        self.consumed = 0

    def consume_rows(self, count: int) -> None:
        if not 0 <= count <= self.available - self.consumed:
            raise TokenmemError(f"cannot consume {count} rows: the window holds {self.available - self.consumed}")
        self.consumed += count


def _local_tokenizer(model):
    """``(tokenizer, None)`` for the tokenizer saved beside a locally loaded model, else ``(None, reason)``."""
    import os

    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path or not os.path.isdir(path):
        return None, f"the model was not loaded from a local directory ({path!r})"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path), None
    except (OSError, ValueError) as exc:  # no tokenizer files there: reported by the caller if it matters
        return None, f"{type(exc).__name__}: {exc}"
