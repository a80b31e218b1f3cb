"""One layer of a TokenMemory: growable token buffers (keys, values, packed metadata, evictor state,
attention-row window), compaction, and the transformers v5 cache-layer API."""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import CacheLayerMixin

from . import kernels
from .attention import expect_attention
from .errors import InputError, MemoryStateError, TokenmemError
from .meta import FIELDS, TokenMeta

CROP_ERROR = ("a TokenMemory cannot be cropped (evicted tokens cannot be restored); "
              "use a DynamicCache for assisted/speculative decoding")


class MemoryLayer(CacheLayerMixin):
    """One layer of a :class:`~tokenmem.TokenMemory` (transformers v5 cache-layer API).

    ``memory`` is the owning memory: the layer reads its evictor's declarations (``state_spec``,
    ``stats_window``), its ``interval``, its model context and its bank."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, memory, index: int):
        self.memory = memory
        self.index = index
        self.is_initialized = False
        self._k = self._v = self._meta = None
        self.state: dict[str, torch.Tensor] = {}
        self.held = 0  # live slots
        self.seen = 0  # tokens appended ever
        self.since_evict = 0
        self.pending = 0  # appended tokens whose metadata the attention call has not written yet
        self.mass: torch.Tensor | None = None  # [b, h, held] latest attention mass
        self.rows: torch.Tensor | None = None  # [b, h, window, capacity] attention rows of recent queries
        self.row_count = 0  # rows not yet consumed by the evictor, ``rows[:, :, :row_count]`` (newest last)
        self.evictions = 0

    # -- tensors ----------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.held]

    @keys.setter
    def keys(self, value):  # transformers' generic helpers assign; we only accept our own views
        if value is not None:
            raise MemoryStateError("TokenMemory layers cannot be assigned keys directly; use update()")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.held]

    @values.setter
    def values(self, value):
        if value is not None:
            raise MemoryStateError("TokenMemory layers cannot be assigned values directly; use update()")

    # the whole buffers (``capacity`` slots; the first ``held`` are live): the memory writes through them
    @property
    def key_buffer(self) -> torch.Tensor | None:
        return self._k

    @property
    def value_buffer(self) -> torch.Tensor | None:
        return self._v

    @property
    def meta_buffer(self) -> torch.Tensor | None:
        return self._meta

    @property
    def packed_meta(self) -> torch.Tensor:
        return self._meta[:, :, : self.held]

    @property
    def meta(self) -> TokenMeta:
        return TokenMeta.from_packed(self.packed_meta)

    @property
    def token_state(self) -> dict[str, torch.Tensor]:
        """The evictor's per-token state of the held tokens, ``name -> [b, h, held, ...]`` (views)."""
        return {name: tensor[:, :, : self.held] for name, tensor in self.state.items()}

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    @property
    def batch_size(self) -> int:
        return self._k.shape[0] if self._k is not None else -1

    def buffers(self) -> list[torch.Tensor]:
        out = [t for t in (self._k, self._v, self._meta, self.mass, self.rows) if t is not None]
        return out + list(self.state.values())

    def consume_rows(self, count: int) -> None:
        """Drop the ``count`` oldest rows of the window (the evictor has folded them into its state)."""
        if not 0 <= count <= self.row_count:
            raise TokenmemError(f"cannot consume {count} rows: the window holds {self.row_count}")
        left = self.row_count - count
        if left and count:
            self.rows[:, :, :left, : self.held] = self.rows[:, :, count : self.row_count, : self.held].clone()
        self.row_count = left

    @property
    def recent_rows(self) -> torch.Tensor | None:
        """``[b, h, r, held]``: attention rows of the ``r`` newest queries not yet consumed by the evictor."""
        if self.rows is None:
            return None
        return self.rows[:, :, : self.row_count, : self.held]

    # -- CacheLayerMixin --------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _allocate(self, like_k, like_v, capacity: int) -> None:
        b, h = like_k.shape[:2]
        old = (self._k, self._v, self._meta, self.state)
        # zeros, as the evictor state and rows: the slots past ``held`` are never live, but uninitialised memory there
        # (NaN bit patterns included) made a buffer comparison flaky, and a kernel that reads a masked slot must
        # never meet NaN (0 * NaN is NaN); a growth is amortised, so the fill costs nothing measurable
        self._k = like_k.new_zeros(b, h, capacity, like_k.shape[-1])
        self._v = like_v.new_zeros(b, h, capacity, like_v.shape[-1])
        self._meta = torch.zeros(b, h, capacity, FIELDS, dtype=torch.long, device=like_k.device)
        spec = self.memory.evictor.state_spec()
        self.state = {
            name: torch.zeros(b, h, capacity, *shape, dtype=dtype, device=like_k.device)
            for name, (shape, dtype) in spec.items()
        }
        window = self.memory.evictor.stats_window
        old_rows = self.rows
        if window > 0:
            self.rows = torch.zeros(b, h, window, capacity, dtype=torch.float32, device=like_k.device)
            if old_rows is not None and self.held:
                self.rows[..., : self.held] = old_rows[..., : self.held]
        if old[0] is not None and self.held:
            n = self.held
            self._k[:, :, :n] = old[0][:, :, :n]
            self._v[:, :, :n] = old[1][:, :, :n]
            self._meta[:, :, :n] = old[2][:, :, :n]
            for name, tensor in old[3].items():
                self.state[name][:, :, :n] = tensor[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.memory.context is not None:
            self.memory.context.check_attention()
        if self.pending:
            raise TokenmemError(
                f"layer {self.index} received new keys before its previous attention call ran through the tokenmem "
                "attention; the model's attention is not 'tokenmem' (was attn_implementation changed after the "
                "TokenMemory was created?). Create the TokenMemory with the model so it can prepare it"
            )
        b, h, q = key_states.shape[0], key_states.shape[1], key_states.shape[2]
        if self._k is not None and self.seen and (b != self._k.shape[0] or h != self._k.shape[1]):
            raise MemoryStateError(
                f"this TokenMemory holds {self._k.shape[0]} sequence(s) x {self._k.shape[1]} KV heads "
                f"({self.seen} tokens seen) but received a batch of {b} x {h}: a memory belongs to one prompt batch. "
                "Create a new TokenMemory (or call memory.reset()) for a new batch"
            )
        self._check_input(key_states, value_states, q)
        needed = self.held + q
        if self._k is None or needed > self.capacity:
            # grow by 1.25x (amortised O(1) appends without doubling the memory of a long context)
            grow = max(needed + 16, self.capacity + self.capacity // 4 + 64)
            self._allocate(key_states, value_states, grow)
        n = self.held
        self._k[:, :, n:needed] = key_states
        self._v[:, :, n:needed] = value_states
        for tensor in self.state.values():
            tensor[:, :, n:needed] = 0
        self.held = needed
        self.seen += q
        self.since_evict += q
        self.pending = q
        keys = self._k[:, :, :needed]
        expect_attention(self.memory, self.index, keys)
        return keys, self._v[:, :, :needed]

    def _check_input(self, key_states: torch.Tensor, value_states: torch.Tensor, q: int) -> None:
        """Refuse, before anything is stored: an empty call, NaN or inf keys/values, and (at layer 0) a memory that an
        earlier forward call left part-way (its first layers took that call's tokens, the others did not)."""
        if self.index == 0 and self.seen:
            every = self.memory.context.num_layers > 0  # a model's memory has all its layers from the start
            behind = [layer.index for layer in self.memory.layers[1:]
                      if (every or layer.is_initialized) and layer.seen != self.seen]
            if behind:
                raise MemoryStateError(
                    f"an earlier forward call stopped part-way through this TokenMemory (an error or an interrupt "
                    f"inside the model): layer 0 has seen {self.seen} tokens but layer {behind[0]} has seen "
                    f"{self.memory.layers[behind[0]].seen}, so it no longer holds one stream. Call memory.reset() (or "
                    "create a new TokenMemory) and feed the prompt again"
                )
        if q == 0:
            raise InputError(f"layer {self.index} received a call without tokens; give the model at least one token "
                             "(an empty prompt cannot be stored or generated from)")
        # one reduction per tensor (NaN and inf propagate through a sum; two float() are cheaper than more tensor ops
        # on a decode step); the exact test only when the sum is not finite
        total = (float(key_states.detach().sum(dtype=torch.float32))
                 + float(value_states.detach().sum(dtype=torch.float32)))
        if not math.isfinite(total):
            bad = [name for name, t in (("keys", key_states), ("values", value_states))
                   if not bool(torch.isfinite(t).all())]
            if bad:  # (else: finite values whose sum overflowed float32)
                stored = ("the memory stored nothing of this call" if self.index == 0 else
                          f"layers 0-{self.index - 1} stored this call already, so call memory.reset() before reusing it")
                raise InputError(
                    f"layer {self.index} received {' and '.join(bad)} with NaN or inf values for {q} new token(s), "
                    f"so attention over them would be NaN; {stored}. Check the model's "
                    "inputs (inputs_embeds, pixel values, states) and weights for NaN/inf, or use float32/bfloat16 "
                    "if float16 overflows"
                )

    def get_seq_length(self) -> int:
        # Tokens *seen*, not held: models derive position ids and generate slices inputs from this.
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.seen + q, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the same, under its transformers 5.2 name
        return -1

    def reset(self) -> None:
        self.__init__(self.memory, self.index)

    def _map_buffers(self, fn) -> None:
        """Replace every per-sequence buffer (keys, values, metadata, evictor state, mass, rows) by
        ``fn(buffer)``: the one place batch selection and device moves enumerate them."""
        self._k, self._v, self._meta = fn(self._k), fn(self._v), fn(self._meta)
        self.state = {k: fn(v) for k, v in self.state.items()}
        self.mass = None if self.mass is None else fn(self.mass)
        self.rows = None if self.rows is None else fn(self.rows)

    def _select_batch(self, index: torch.Tensor) -> None:
        if self._k is None:
            return
        index = index.to(self._k.device)
        self._map_buffers(lambda t: t[index])
        if self.memory.bank is not None:  # the memory bank's streams follow their batch rows
            self.memory.bank.select_batch(self.index, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._select_batch(torch.arange(self._k.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise MemoryStateError(CROP_ERROR)

    def offload(self):
        if self._k is not None:
            self._move("cpu")

    def prefetch(self):
        if self._k is not None and self._k.device != self.device:
            self._move(self.device)

    def _move(self, device) -> None:
        self._map_buffers(lambda t: t.to(device))

    # -- eviction ---------------------------------------------------------------------------------
    def compact(self, index: torch.Tensor) -> None:
        """Keep the slots ``index [b, h, k]`` (ascending) of keys, values, metadata, state and mass."""
        n, k = self.held, index.shape[-1]
        kernels.compact_([self._k, self._v, self._meta, *self.state.values()], index)
        if self.mass is not None and self.mass.shape[-1] == n:
            self.mass = kernels.gather_tokens(self.mass, index)
        if self.rows is not None and self.row_count:  # rows follow their keys (dim 3)
            live = self.rows[:, :, : self.row_count, :n]
            idx = index[:, :, None, :].expand(-1, -1, self.row_count, -1)
            self.rows[:, :, : self.row_count, :k] = torch.gather(live, 3, idx)
        self.held = k
        slack = max(self.memory.interval, 1)
        if self.capacity > 2 * (k + slack) and self.capacity > 64:  # give back what a long prefill took
            self._allocate(self._k, self._v, k + slack)
