"""A MemLong-style memory bank: evicted tokens kept off-device in chunks and retrieved back into attention.

MemLong (Liu et al., "MemLong: Memory-Augmented Retrieval for Long Text Modeling", 2024, arXiv:2408.16967)
stores the keys and values of past chunks in a non-trainable memory bank, retrieves the chunks most relevant
to the current input and lets attention see them beside the local context; when the bank is full it drops the
chunks retrieved least often. This module is the training-free form of that idea for any evictor:
``TokenMemory(..., bank=True)`` or ``bank=Bank(...)``.

* **Capture.** When the memory evicts a layer, the real tokens it removes (and, for ragged decisions such as
  NAMM's, the surplus slots it masks: real tokens that head dropped) go to the bank of that layer with their
  :class:`~tokenmem.TokenMeta`, per stream (batch row, KV head), in the order they were evicted (position
  order within one eviction). Padding is never banked. Tokens collect in a *pending* buffer until they fill
  a chunk of ``chunk_size``; the pending partial chunk is retrievable too, so nothing is ever out of reach.
* **Representatives.** A chunk is scored against the call's query by its keys: ``"max"`` (default: every
  key of the chunk stands for it and the chunk scores its best match, ``max_j q . k_j``, an exact maximum
  inner product search over the banked keys, which is what attention itself would pick), ``"mean"`` (one
  mean key per chunk and KV head: ``mean(q) . mean(k)`` is exactly the mean pre-softmax logit between the
  call's queries and the chunk's keys) or ``"top"`` (the key that accumulated the most attention mass while
  it was live, the H2O criterion). In ``shift`` mode keys are compared re-rotated to position 0, so chunks
  compare on content rather than on the cache slot they were evicted from. The query is the mean of the
  call's last ``recent_queries`` (default 4) queries over the KV head's query group: a 128-token prefill
  chunk's mean query is dominated by its older tokens, while the newest few say what is being asked.
* **Defaults** (``chunk_size=32``, ``retrieve=8``, ``retrieve_every=1``, ``representative="max"``,
  ``recent_queries=4``) were chosen on the *evolve* files only, by ``benchmarks/bank_select.py``: a coordinate
  search on 48 planted-value retrieval prompts (the ``select`` set), objective sink + bank exact match at 25% and
  50% KV, with the tokens brought back fixed beforehand at 256 per layer and KV head. Measured there: 81.25
  (the full cache: 81.2) against 69.8 for the previous defaults (64 x 4, last 8 queries, refresh every 8);
  ``"mean"`` 66.7, ``"top"`` 52.1, all of a chunk's queries 54.2 (``benchmarks/results/bank_select.md``). The
  held-out figures are in ``benchmarks/results/bank.md`` (README, "Memory bank"). ``"max"`` costs one
  ``[d] x [d, tokens]`` product per refresh over the banked keys of a stream (host memory), so it needs them in
  host memory: with ``spill_dir`` use ``"mean"`` or ``"top"``, whose one key per chunk stays in host memory.
* **Retrieval.** For each forward call of a layer with a non-empty bank, every multi-token call (a prefill
  chunk) and every ``retrieve_every`` decode steps, each (batch row, KV head) scores its chunks against the
  call's query (the mean of its last ``recent_queries`` valid queries over the KV head's query group, see
  Representatives) and takes the best ``retrieve``. Their keys and values are copied to the device and
  *prepended* to the live keys given to :func:`tokenmem.kernels.attention_with_stats` (causality is by slot
  and bottom-right aligned, so every query sees them); the statistics (mass, attention rows) are sliced back to
  the live keys, so evictors see only what they manage. Positions: ``original`` mode uses the keys as stored
  (rotated at their original positions); in ``shift`` mode (cache slots are positions ``0 .. n-1``) the
  retrieved keys are re-rotated, by default (``placement="zero"``) all to position 0, which is what MemLong's
  authors settled on (their README, github.com/Bui1dMySea/MemLong: re-assigning positions so that retrieved
  chunks precede the current chunk "can lead to catastrophic information collapse", so they set the retrieved
  chunks' positions to 0 -- in their fine-tuned setting), or (``placement="before"``) to positions
  ``-r .. -1`` in stream order, as if they came right before the cache. Measured training-free on the shipped
  model (``benchmarks/bank.py``, sink + bank in shift mode): 95.8% / 95.8% exact match at 25% / 50% budget
  with ``"zero"``, 93.8% / 95.8% with ``"before"``.
  Retrieved tokens are never added to the live cache; the set is replaced at the next refresh, so the device
  holds at most ``budget + interval + retrieve * chunk_size`` tokens per layer and KV head.
* **Limit.** ``max_chunks`` bounds the chunks of each stream (layer, batch row, KV head). A full stream drops
  its least-retrieved chunk first (MemLong's counter), ties to the oldest; drops are counted and logged with
  their positions (``memory.stats()["bank"]``; :attr:`MemoryBank.dropped` keeps the newest 4,096).
* **Spill.** With ``spill_dir`` the chunks' keys, values and metadata are written to safetensors files (one
  per layer and eviction) and read back memory-mapped (``safe_open``) when retrieved; the bank keeps a CRC-32
  of every chunk, and a missing, truncated or corrupt file raises :class:`BankError` instead of attending to
  wrong data. Representatives, counters and positions stay in host memory.
"""

from __future__ import annotations

import os
import weakref
from collections import deque
from dataclasses import dataclass

import torch

from tokenmem.errors import TokenmemError

from .spill import BankError, Spill
from .store import DroppedChunk, LayerBank, Retrieved

__all__ = ["Bank", "BankError", "DroppedChunk", "MemoryBank", "Retrieved", "make_bank"]

REPRESENTATIVES = ("max", "mean", "top")
PLACEMENTS = ("zero", "before")
LOG_IN_STATS = 32  # dropped-chunk records listed by stats()
DROP_LOG = 4096  # dropped-chunk records kept in MemoryBank.dropped (the counts are totals)


@dataclass
class Bank:
    """Options of the memory bank (pass to ``TokenMemory(..., bank=Bank(...))``; ``bank=True`` uses defaults,
    chosen on the evolve files by ``benchmarks/bank_select.py``).

    Args:
        chunk_size: evicted tokens per chunk (per batch row and KV head).
        retrieve: chunks retrieved per layer, batch row and KV head (0: keep the bank, never retrieve).
        retrieve_every: decode steps between refreshes of the retrieved set (multi-token calls always refresh).
        max_chunks: chunks kept per stream (layer, batch row, KV head); ``None``: unbounded. When full, the
            least-retrieved chunk is dropped (ties: the oldest).
        spill_dir: write chunks to safetensors files under this directory instead of keeping them in host memory.
        representative: ``"max"`` (a chunk scores its best-matching key; needs the keys in host memory, so not
            with ``spill_dir``), ``"mean"`` (mean key of the chunk) or ``"top"`` (the key with the most accumulated
            attention mass; makes the memory compute attention mass on every call). ``None`` (default):
            ``"max"``, or ``"mean"`` with ``spill_dir``.
        recent_queries: score chunks with the mean of the call's last ``recent_queries`` queries (``None``: all of
            them); a long prefill chunk's mean query is dominated by its older tokens.
        placement: ``shift`` mode only: retrieved keys all at position 0 (``"zero"``, MemLong's choice, the default)
            or at positions ``-r .. -1`` (``"before"``); ``original`` mode keeps their original positions.
    """

    chunk_size: int = 32
    retrieve: int = 8
    retrieve_every: int = 1
    max_chunks: int | None = None
    spill_dir: str | os.PathLike | None = None
    representative: str | None = None
    recent_queries: int | None = 4
    placement: str = "zero"

    def __post_init__(self):
        def count(name, value, low):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TokenmemError(f"Bank({name}={value!r}): {name} must be an int >= {low}")

        count("chunk_size", self.chunk_size, 1)
        count("retrieve", self.retrieve, 0)
        count("retrieve_every", self.retrieve_every, 1)
        if self.max_chunks is not None:
            count("max_chunks", self.max_chunks, 1)
        if self.recent_queries is not None:
            count("recent_queries", self.recent_queries, 1)
        if self.placement not in PLACEMENTS:
            raise TokenmemError(f"Bank(placement={self.placement!r}): use one of {PLACEMENTS}")
        if self.representative is None:
            self.representative = "mean" if self.spill_dir is not None else "max"
        if self.representative not in REPRESENTATIVES:
            raise TokenmemError(f"Bank(representative={self.representative!r}): use one of {REPRESENTATIVES}")
        if self.representative == "max" and self.spill_dir is not None:
            raise TokenmemError("Bank(representative='max', spill_dir=...): 'max' scores every banked key, which must "
                                "stay in host memory; with spill_dir use representative='mean' or 'top'")

def make_bank(bank, memory) -> "MemoryBank | None":
    """The runtime bank of ``memory`` for the ``bank=`` argument of :class:`~tokenmem.TokenMemory`."""
    if bank is None or bank is False:
        return None
    if bank is True:
        bank = Bank()
    if not isinstance(bank, Bank):
        raise TokenmemError(f"bank must be True, False/None or a tokenmem.bank.Bank, got {type(bank).__name__}")
    return MemoryBank(bank, memory)


class MemoryBank:
    """The bank of one :class:`~tokenmem.TokenMemory` (``memory.bank``); ``options`` is its :class:`Bank`."""

    def __init__(self, options: Bank, memory):
        self.options = options
        self._memory = weakref.ref(memory)
        self.layers: dict[int, LayerBank] = {}
        self.dropped: deque[DroppedChunk] = deque(maxlen=DROP_LOG)  # the newest drops, with their positions
        self.dropped_chunks = self.dropped_tokens = 0
        self.refreshes = 0
        self.spill = Spill(options.spill_dir) if options.spill_dir is not None else None

    @property
    def needs_mass(self) -> bool:
        """True when the attention must compute the per-key mass for the bank (``representative="top"``)."""
        return self.options.representative == "top"

    def rotation(self):
        """The RoPE frequencies to re-rotate banked keys with (``shift`` mode on a RoPE model), else None."""
        memory = self._memory()
        if memory is None or memory.positions != "shift" or memory.context is None:
            return None
        return memory.context.inv_freq

    def _layer(self, index: int) -> "LayerBank":
        if index not in self.layers:
            self.layers[index] = LayerBank(self, index)
        return self.layers[index]

    # -- hooks called by TokenMemory ----------------------------------------------------------------
    def observe(self, layer) -> None:
        """After a layer's attention: accumulate the mass its live keys received (``"top"`` representatives)."""
        if self.needs_mass and layer.mass is not None:
            self._layer(layer.index).observe(layer.mass)

    def capture(self, layer, index: torch.Tensor, kept_ok: torch.Tensor | None) -> None:
        """Before ``layer.compact(index)``: bank the real tokens the eviction removes, and the kept slots that
        ``kept_ok`` (ragged decisions) marks as masked."""
        self._layer(layer.index).capture(layer, index, kept_ok)

    def retrieve(self, layer, query: torch.Tensor, query_valid: torch.Tensor | None) -> Retrieved | None:
        """The tokens to prepend to this call's keys, or None (empty bank, ``retrieve=0``)."""
        bank = self.layers.get(layer.index)
        if bank is None or self.options.retrieve == 0 or bank.empty:
            return None
        return bank.retrieve(query, query_valid)

    def select_batch(self, layer_index: int, index: torch.Tensor) -> None:
        """Beam search / batch selection: the bank's streams follow the memory's batch rows."""
        if layer_index in self.layers:
            self.layers[layer_index].select_batch(index)
            if self.spill is not None:
                self.spill.recount(self.layers.values())

    def reset(self) -> None:
        self.layers.clear()
        self.dropped.clear()
        self.dropped_chunks = self.dropped_tokens = 0
        self.refreshes = 0
        if self.spill is not None:
            self.spill.clear()

    # -- inspection -------------------------------------------------------------------------------
    def contents(self, layer: int, batch: int, head: int):
        """Every token the bank holds for one stream, in position order: ``(keys [t, d], values [t, dv],
        meta [t, FIELDS])`` (packed :class:`~tokenmem.TokenMeta`; chunks, spilled ones included, and pending)."""
        bank = self.layers.get(layer)
        if bank is None:
            return None
        return bank.contents(batch, head)

    def stats(self) -> dict:
        """Chunks and tokens banked, bytes in host memory and spilled to disk, retrieved tokens on the device,
        and the dropped chunks (count, tokens, the newest records with their positions)."""
        chunks = tokens = pending = host = device = 0
        retrieved = []
        for _, bank in sorted(self.layers.items()):
            used = int(bank.used.sum()) if bank.used is not None else 0
            chunks += used
            pend = int(bank.pn.sum()) if bank.pn is not None else 0
            pending += pend
            tokens += used * self.options.chunk_size + pend
            host += bank.host_bytes()
            retrieved.append(0 if bank.active is None else bank.active.size)
            if bank.active is not None:
                device += sum(t.numel() * t.element_size() for t in (bank.active.keys, bank.active.values, bank.active.valid))
        spilled = self.spill.bytes() if self.spill is not None else 0
        return {"chunks": chunks, "tokens": tokens, "pending": pending, "host_bytes": host, "spilled_bytes": spilled,
                "bytes": host + spilled, "device_bytes": device, "retrieved": retrieved, "refreshes": self.refreshes,
                "dropped_chunks": self.dropped_chunks, "dropped_tokens": self.dropped_tokens,
                "dropped": [d.as_dict() for d in list(self.dropped)[-LOG_IN_STATS:]],
                "chunk_size": self.options.chunk_size, "retrieve": self.options.retrieve,
                "representative": self.options.representative}

    def __repr__(self) -> str:
        return f"MemoryBank({self.options!r})"
