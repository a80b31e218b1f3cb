"""Attention for evictors that read attention rows (``Evictor.stats_window`` > 0, e.g. NAMM).

A layer keeps a window of the rows of its newest queries (``MemoryLayer.rows``); the evictor observes them
and consumes the rows it has folded into its state. A call's queries are processed in sub-chunks so that
every query's row reaches the evictor exactly once, whatever the call size: :func:`attend_in_window`
fills the window exactly; :func:`attend_in_row_chunks` (evictors that set ``rows_chunk``) hands a whole
sub-chunk's rows over at once through a scratch buffer.

Both are called by :meth:`tokenmem.TokenMemory.attend` with the memory, which supplies the kernel call
(:meth:`~tokenmem.TokenMemory.kernel`), the evictor and the view the evictor observes.
"""

from __future__ import annotations

import torch

from .errors import TokenmemError


def attend_in_window(memory, layer, query, q, scaling, causal, key_valid, query_valid, need_mass, dropout,
                     extra=None):
    """Attention for evictors that read attention rows (``stats_window`` > 0): the call's queries are
    processed in sub-chunks that fill the rows window exactly, and the evictor observes (and may
    consume) the rows after each sub-chunk, so every query's row reaches it whatever the call size."""
    keys, values = layer.key_buffer, layer.value_buffer
    n, w = layer.held, layer.rows.shape[2]
    outs = []
    mass = torch.zeros(keys.shape[0], keys.shape[1], n, device=query.device) if need_mass else None
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
        out, part = memory.kernel(
            extra, query[:, :, s : s + c], keys[:, :, :limit], values[:, :, :limit], scaling=scaling,
            causal=causal, key_valid=None if key_valid is None else key_valid[..., :limit],
            query_valid=None if query_valid is None else query_valid[:, s : s + c],
            need_mass=need_mass, rows=rows, dropout=dropout,
        )
        outs.append(out)
        if mass is not None:
            mass[..., :limit] += part
        layer.row_count += c
        layer.mass = mass
        memory.evictor.observe(memory.view(layer, memory.budget_tokens(layer.seen) or n, c))
        s += c
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attend_in_row_chunks(memory, layer, query, q, scaling, causal, key_valid, query_valid, need_mass, dropout,
                         extra=None):
    """Attention for a call longer than the free part of the rows window, for evictors that set
    ``rows_chunk``: the queries go in sub-chunks of up to ``rows_chunk``, one kernel call each, whose rows
    land in a scratch buffer behind the rows not yet consumed; the evictor observes them all at once, and
    the newest rows it leaves (at most the window) return to the layer's window. Every query's row
    reaches the evictor exactly once, as in :func:`attend_in_window`, with far fewer kernel calls and
    observations, while the layer keeps only ``stats_window`` rows between calls."""
    keys, values = layer.key_buffer, layer.value_buffer
    n, w = layer.held, layer.rows.shape[2]
    b, h = keys.shape[:2]
    step = memory.evictor.rows_chunk
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
        out, part = memory.kernel(
            extra, query[:, :, s : s + c], keys[:, :, :limit], values[:, :, :limit], scaling=scaling,
            causal=causal, key_valid=None if key_valid is None else key_valid[..., :limit],
            query_valid=None if query_valid is None else query_valid[:, s : s + c],
            need_mass=need_mass, rows=scratch[:, :, r:, :limit], dropout=dropout,
        )
        outs.append(out)
        if mass is not None:
            mass[..., :limit] += part
        layer.mass = mass
        window = ScratchRows(scratch)
        memory.evictor.observe(memory.view(layer, memory.budget_tokens(layer.seen) or n, c, rows=scratch,
                                           rows_window=window))
        left = min(r + c - window.consumed, w)  # the newest unconsumed rows, at most the window
        layer.rows[:, :, :left, :n] = scratch[:, :, r + c - left :]
        layer.row_count = left
        s += c
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class ScratchRows:
    """Stands in for the layer while an evictor observes scratch rows: counts the rows it consumes."""

    def __init__(self, rows: torch.Tensor):
        self.available = rows.shape[2]
        self.consumed = 0

    def consume_rows(self, count: int) -> None:
        if not 0 <= count <= self.available - self.consumed:
            raise TokenmemError(f"cannot consume {count} rows: the window holds {self.available - self.consumed}")
        self.consumed += count
