"""TokenMemory: a ``transformers`` Cache with a budget, an evictor and per-token metadata.

Each layer (:class:`~tokenmem.layer.MemoryLayer`) stores keys, values, packed :class:`~tokenmem.meta.TokenMeta`
and the evictor's per-token state in growable buffers ``[batch, kv_heads, capacity, ...]``; the first ``held``
slots are live and ordered by stream position. The ``"tokenmem"`` attention function (:mod:`tokenmem.attention`)
hands each layer's attention call to :meth:`TokenMemory.attend`, which computes it from these buffers,
records the attention statistics the evictor declared it needs, and then evicts: every ``interval`` new
tokens, and at the end of every multi-token (prefill) call, when the layer holds more than its budget.
Eviction keeps the protected tokens plus the best-scored ones, per batch row and KV head
(:func:`~tokenmem.selection.choose_kept`), and compacts everything in one gather.

Where the parts live: settings in :mod:`tokenmem.config`, metadata packing in :mod:`tokenmem.meta`, RoPE
re-rotation in :mod:`tokenmem.rope`, the attention-rows window in :mod:`tokenmem.rows`, the choice of kept
tokens in :mod:`tokenmem.selection`, the model's facts in :mod:`tokenmem.model`, the memory bank in
:mod:`tokenmem.bank`.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache

from . import kernels
from .bank import make_bank
from .config import EVICT_UNITS, POSITION_MODES, MemoryConfig, validate_budget  # noqa: F401  (re-exported)
from .errors import MemoryStateError, TokenmemError
from .evictor import DEFAULT_INTERVAL, Evictor, LayerView  # noqa: F401  (DEFAULT_INTERVAL re-exported)
from .layer import CROP_ERROR, MemoryLayer
from .meta import FLAGS, PAD, ROPE, TokenMeta, pack_call
from .model import ModelContext, as_id_tensor, prepare_model
from .occupancy import allocated_bytes, count_range, held_fraction, layer_held, mean_count, token_bytes
from .rope import rotate_to_slots, shift_call
from .rows import attend_in_row_chunks, attend_in_window
from .selection import choose_kept, select_kept, whole_segments  # noqa: F401  (re-exported)
from .separators import local_tokenizer, separator_ids as tokenizer_separator_ids

_KEYWORD_DEFAULTS = dict(evictor="full", budget=None, interval=None, positions="original", separator_ids=None,
                         record_stats=False, evict_unit="token", bank=None, decode_span=1)


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
            (positions inside the cache; kept keys are re-rotated for RoPE models, ignored without RoPE;
            refused for multimodal RoPE, whose sections are not re-rotated).
        config: a :class:`~tokenmem.config.MemoryConfig` instead of the keyword arguments above and below
            (``tokenizer`` may still be given).
        tokenizer / separator_ids: where separator tokens come from (needed by evictors that declare
            ``needs_separators``, e.g. ``separator``); by default the tokenizer saved beside a local model is
            used when one exists. The ids belong to this memory (other memories on the model have their own).
        record_stats: always compute the per-key attention mass (``layer.mass``), even when the evictor
            does not need it.
        evict_unit: ``"token"`` (each token kept or dropped on its own) or ``"segment"`` (all tokens of a
            segment -- a video frame, a timestep -- kept or dropped together, scored by the mean of their
            scores; text tokens and tokens with segment -1 stay per token; see :func:`whole_segments`).
        bank: ``True`` or a :class:`tokenmem.bank.Bank`: evicted tokens go to a MemLong-style memory bank
            (host memory or disk) and the best-matching chunks are retrieved back into attention
            (:mod:`tokenmem.bank`); ``memory.bank`` is the runtime bank. ``None``/``False``: no bank.
        decode_span: calls of at most this many new tokens count as decode steps: they evict only once
            ``interval`` new tokens have accumulated, so held tokens stay within ``budget + interval - 1`` between
            calls (default 1: every multi-token call ends with an eviction when over budget). The Decision
            Transformer adapter sets 3 (one timestep: return, state, action), so a rollout evicts every
            ``interval`` tokens instead of at every step.
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
        config: MemoryConfig | None = None,
        tokenizer=None,
        separator_ids=None,
        record_stats: bool = False,
        evict_unit: str = "token",
        bank=None,
        decode_span: int = 1,
        **evictor_options,
    ):
        given = dict(evictor=evictor, budget=budget, interval=interval, positions=positions,
                     separator_ids=separator_ids, record_stats=record_stats, evict_unit=evict_unit, bank=bank,
                     decode_span=decode_span)
        if config is None:
            config = MemoryConfig(**given, evictor_options=evictor_options)
        elif not isinstance(config, MemoryConfig):
            raise TokenmemError(f"config must be a tokenmem.MemoryConfig, got {type(config).__name__}")
        elif evictor_options or any(given[k] is not None if v is None else given[k] != v
                                    for k, v in _KEYWORD_DEFAULTS.items()):
            raise TokenmemError("pass the memory settings either as config=MemoryConfig(...) or as keyword "
                                "arguments, not both")
        self.config = config
        self.evictor = config.make_evictor()
        self.budget = config.budget
        self.interval = config.interval_for(self.evictor)
        self.decode_span = config.decode_span
        self.positions = config.positions
        self.evict_unit = config.evict_unit
        self.record_stats = config.record_stats
        self.context = prepare_model(model) if model is not None else ModelContext(num_layers=0, previous_attn=None)
        if self.positions == "shift" and self.context.mrope:
            raise TokenmemError(
                "positions='shift' re-rotates cached keys by one position per slot, but this model uses multimodal "
                "RoPE (one rotary section per temporal/height/width axis, Qwen2-VL), which tokenmem does not "
                "re-rotate; use positions='original'"
            )
        self.separator_ids = self._find_separators(model, tokenizer)
        self._annotation: TokenMeta | None = None
        self._chunk: tuple | None = None
        self.has_padding = False
        self.padding_seen: torch.Tensor | None = None  # [batch] padding tokens each row has seen (None: none)
        super().__init__(layers=[MemoryLayer(self, i) for i in range(self.context.num_layers)])
        self.bank = make_bank(config.bank, self)  # None without a bank

    def _find_separators(self, model, tokenizer) -> torch.Tensor | None:
        """This memory's separator ids: given, from the tokenizer, from the tokenizer beside a local model
        (for evictors that need them), or the model's default (``prepare_model(separator_ids=...)``)."""
        ids, problem = self.config.separator_ids, None
        if ids is None and tokenizer is None and model is not None and self.evictor.needs_separators:
            tokenizer, problem = local_tokenizer(model)
        if ids is None and tokenizer is not None:
            ids = as_id_tensor(tokenizer_separator_ids(tokenizer))
        if ids is None and self.context.default_separator_ids is not None:
            ids = self.context.default_separator_ids.clone()
        if ids is None and self.evictor.needs_separators:
            why = f" (the tokenizer beside the model could not be loaded: {problem})" if problem else ""
            raise TokenmemError(
                f"the {self.evictor.name} evictor needs to know the separator tokens: pass tokenizer=<the model's "
                f"tokenizer> or separator_ids=[...] to TokenMemory{why}"
            )
        return ids

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
        self.padding_seen = None
        if self.bank is not None:
            self.bank.reset()

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.padding_seen is not None:  # the padding counts follow their rows
            self.padding_seen = self.padding_seen[index.cpu()]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._select_rows(beam_idx)
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        self._select_rows(indices)
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.padding_seen is not None:
            self._select_rows(torch.arange(self.padding_seen.shape[0]).repeat_interleave(repeats))
        super().batch_repeat_interleave(repeats)

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
        """What the memory holds, honestly (:mod:`tokenmem.occupancy`):

        * ``seen``: tokens seen; ``budget``: tokens per layer and KV head the budget allows now (``None``: all);
        * ``held``: per layer, the valid tokens it really holds -- not masked by a ragged eviction, not left
          padding -- per (batch row, KV head), as their mean over rows and heads (an int when it is whole);
        * ``held_per_head``: per layer, ``[batch][kv_heads]`` lists of those valid counts;
        * ``held_slots``: per layer, the slots allocated per (row, KV head) (the largest head's count: masked
          and padding slots included);
        * ``held_fraction``: the valid tokens held as a fraction of the real tokens seen (padding left out),
          mean over layers;
        * ``bytes``: every buffer allocated (keys, values, metadata, evictor state, statistics);
          ``kv_bytes``: the keys and values of the valid tokens only;
        * ``evictions``, ``evictor``, ``positions``; with a memory bank, ``"bank"``: its chunks, bytes (host,
          spilled, retrieved on the device) and drops.
        """
        counts = [layer_held(layer) for layer in self.layers]
        held = [mean_count(c) for c in counts]
        kv_bytes = sum(int(c.sum()) * token_bytes(layer) for layer, c in zip(self.layers, counts))
        seen = self.seen
        fraction = held_fraction(counts, seen, self.padding_seen)
        bank = {} if self.bank is None else {"bank": self.bank.stats()}
        return {
            "seen": seen,
            "held": held,
            "held_per_head": [c.tolist() for c in counts],
            "held_slots": [layer.held for layer in self.layers],
            "held_fraction": fraction,
            "budget": self.budget_tokens(),
            "bytes": sum(allocated_bytes(layer) for layer in self.layers),
            "kv_bytes": kv_bytes,
            "evictions": sum(layer.evictions for layer in self.layers),
            "evictor": self.evictor.name,
            "positions": self.positions,
            **bank,
        }

    def summary(self) -> str:
        """A one-line, human-readable memory summary (valid tokens held per layer; the allocated slots when they
        differ: masked or padding slots)."""
        s = self.stats()
        held_txt = count_range(s["held"])
        if s["held_slots"] != s["held"]:
            held_txt += f" (slots {count_range(s['held_slots'])})"
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

    # -- the attention path (called by the "tokenmem" attention function) ------------------------------
    def attend(self, layer_idx, query, mask2d, position_ids, *, scaling, causal, dropout):
        """The attention of layer ``layer_idx`` over what it holds, for the keys this memory just received
        (:func:`tokenmem.attention.tokenmem_attention` calls it): the call's metadata is stored, the
        statistics the evictor declared are computed and observed, and the layer evicts when due.
        Returns ``[b, hq, q, dv]``."""
        layer = self.layers[layer_idx]
        q = query.shape[2]
        if layer.pending != q:
            raise TokenmemError(
                f"layer {layer_idx}: the attention call has {q} queries but the memory just received {layer.pending} "
                "keys; the model must call the cache's update() (cache.update(...), the memory) right before attention"
            )
        n = layer.held
        chunk = self._call_meta(layer, q, mask2d, position_ids, query.device)
        layer.meta_buffer[:, :, n - q : n] = chunk
        layer.pending = 0
        if self.positions == "shift" and self.context.inv_freq is not None:
            start = layer.held - q
            query = shift_call(layer.key_buffer[:, :, start:n], layer.meta_buffer[:, :, start:n, ROPE], start, query,
                               self.context.inv_freq)
        key_valid = query_valid = None
        if self.has_padding:
            key_valid = (layer.meta_buffer[:, :, :n, FLAGS] & PAD) == 0  # [b, h, n]
            query_valid = (chunk[:, 0, :, FLAGS] & PAD) == 0  # [b, q]
        need_mass = self.record_stats or self.evictor.needs_stats or (self.bank is not None and self.bank.needs_mass)
        extra = None if self.bank is None else self.bank.retrieve(layer, query, query_valid)  # banked tokens
        args = (layer, query, q, scaling, causal, key_valid, query_valid, need_mass, dropout, extra)
        if layer.rows is not None and self.evictor.rows_chunk and q > layer.rows.shape[2] - layer.row_count:
            out = attend_in_row_chunks(self, *args)
        elif layer.rows is None:
            out, mass = self.kernel(
                extra, query, layer.keys, layer.values, scaling=scaling, causal=causal,
                key_valid=key_valid, query_valid=query_valid, need_mass=need_mass, dropout=dropout,
            )
            layer.mass = mass
            if self.evictor.needs_stats:
                self.evictor.observe(self.view(layer, self.budget_tokens(layer.seen) or n, q))
        else:
            out = attend_in_window(self, *args)
        if self.bank is not None:
            self.bank.observe(layer)
        self._maybe_evict(layer, q)
        return out

    def _call_meta(self, layer: MemoryLayer, q: int, mask2d, position_ids, device) -> torch.Tensor:
        """Packed metadata ``[b, 1, q, FIELDS]`` of the tokens just appended (computed once per forward, at its
        first layer, from the annotation, the inputs the model's hooks posted and this memory's separators)."""
        start = layer.seen - q
        b = layer.key_buffer.shape[0]
        if self._chunk is not None and self._chunk[0] == (start, q, b):
            return self._chunk[1]
        input_ids, mrope_positions = self.context.take_inputs()
        meta, padded = pack_call(b, q, start, device, annotation=self._annotation, input_ids=input_ids,
                                 separator_ids=self.separator_ids, mask2d=mask2d, position_ids=position_ids,
                                 mrope_position_ids=mrope_positions)
        self._annotation = None
        if padded:
            self.has_padding = True
            pads = ((meta[..., FLAGS] & PAD) != 0).sum(-1).cpu()  # [b]
            self.padding_seen = pads if self.padding_seen is None else self.padding_seen + pads
        chunk = meta[:, None]  # [b, 1, q, F]
        self._chunk = ((start, q, b), chunk)
        return chunk

    @staticmethod
    def kernel(extra, query, keys, values, **kwargs):
        """:func:`kernels.attention_with_stats`; with ``extra`` (tokens retrieved from the memory bank) their keys
        are prepended to ``keys`` and the statistics still cover ``keys`` only (see ``Retrieved.attend``)."""
        if extra is None:
            return kernels.attention_with_stats(query, keys, values, **kwargs)
        return extra.attend(query, keys, values, **kwargs)

    def view(self, layer: MemoryLayer, budget: int, new_tokens: int, *, rows=None, rows_window=None) -> LayerView:
        """What the evictor sees of ``layer`` (``rows``/``rows_window``: a scratch rows window instead of the layer's)."""
        return LayerView(
            layer=layer.index,
            keys=layer.keys,
            values=layer.values,
            meta=layer.meta,
            state=layer.token_state,
            mass=layer.mass,
            rows=layer.recent_rows if rows is None else rows,
            rows_window=layer if rows_window is None else rows_window,
            seen=layer.seen,
            budget=budget,
            new_tokens=new_tokens,
            memory=self,
        )

    # -- eviction ---------------------------------------------------------------------------------
    def layer_budget(self, layer: MemoryLayer, keep: int | None = None) -> tuple[int | None, int | None]:
        """``(spend, cap)`` of ``layer`` for the memory's budget ``keep`` (default: the budget after the layer's
        tokens seen): the evictor's :meth:`~tokenmem.Evictor.layer_budget`, ``(keep, keep)`` for every evictor
        but the budget allocators; ``(None, None)`` without a budget."""
        if keep is None:
            keep = self.budget_tokens(layer.seen)
            if keep is None:
                return None, None
        spend, cap = self.evictor.layer_budget(keep, layer.index, self)
        for name, value in (("spend", spend), ("cap", cap)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TokenmemError(f"evictor {self.evictor.name!r}: layer_budget({keep}, {layer.index}) must return "
                                    f"two token counts >= 1 (spend, cap), got {name}={value!r}")
        return spend, cap

    def _maybe_evict(self, layer: MemoryLayer, q: int) -> None:
        if not self.evictor.evicts:
            return
        spend = self.layer_budget(layer)[0]  # the memory's budget unless an allocator moves tokens between layers
        if self.evictor.threshold is not None:  # the evictor sets the count: update every interval tokens
            over_budget = spend is not None and layer.held > spend and q > self.decode_span
            if layer.since_evict >= self.interval or over_budget:
                self.evict_layer(layer, self.budget_tokens(layer.seen))
            return
        if layer.held <= spend or not (layer.since_evict >= self.interval or q > self.decode_span):
            return
        self.evict_layer(layer, self.budget_tokens(layer.seen))

    def evict_layer(self, layer: MemoryLayer, keep: int | None) -> None:
        """Evict one layer to the memory's budget of ``keep`` tokens per (batch row, KV head) (``None``: no budget),
        as the evictor spends it on this layer (:meth:`layer_budget`: at most ``keep`` per head for every
        evictor but the budget allocators, which give layers or heads different shares of the same total).

        Threshold evictors (``evictor.threshold`` set, e.g. NAMM) keep the tokens scoring at least the
        threshold, capped at ``keep`` when a budget is given; with ``evict_unit="segment"`` whole segments
        are kept or dropped (:func:`whole_segments`). Rows and KV heads may then want different
        counts: the memory keeps the largest count ``K`` in every row and head (tensors stay rectangular)
        and *masks* the surplus slots of the rows that wanted fewer (flag ``PAD``: never attended, and
        evicted first at the next update). Attention thus follows each head's own decision exactly.
        """
        view = self.view(layer, keep if keep is not None else layer.held, 0)
        b, h, n = view.meta.position.shape
        cap = None if keep is None else self.layer_budget(layer, keep)[1]
        who = f"evictor {self.evictor.name!r}"
        if cap != keep:
            who += f" (which lets this layer keep {cap} tokens per head of the memory's budget of {keep})"
        scores = torch.as_tensor(self.evictor.score(view)).expand(b, h, n)
        index, kept_ok = choose_kept(
            scores, self.evictor.protect(view), view.meta, cap, threshold=self.evictor.threshold,
            segments=self.evict_unit == "segment", grow_budget=isinstance(self.budget, float),
            who=who, layer=layer.index, seen=layer.seen,
        )
        if self.bank is not None:  # the tokens leaving (or masked by a ragged decision) go to the memory bank
            self.bank.capture(layer, index, kept_ok)
        layer.compact(index)
        if kept_ok is not None and not bool(kept_ok.all()):  # ragged decisions: mask the surplus slots
            layer.meta_buffer[:, :, : index.shape[-1], FLAGS] |= (~kept_ok).long() * PAD
            self.has_padding = True
        if self.positions == "shift" and self.context.inv_freq is not None:  # kept keys to slots 0 .. held-1
            rotate_to_slots(layer.keys, layer.meta_buffer[:, :, : layer.held, ROPE], 0, self.context.inv_freq)
        layer.since_evict = 0
        layer.evictions += 1
