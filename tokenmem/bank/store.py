"""Storage of the memory bank (:mod:`tokenmem.bank`) for one layer: chunk slots per stream with their
representatives and retrieval counters, the pending buffer, capture of evicted tokens, the least-retrieved
dropping policy, and retrieval (scoring, gathering, MemLong's placement in ``shift`` mode)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from tokenmem import kernels
from tokenmem.errors import TokenmemError
from tokenmem.meta import FIELDS, FLAGS, PAD, POSITION, ROPE
from tokenmem.rope import rotate_by


@dataclass
class DroppedChunk:
    """A chunk the bank dropped because its stream was full."""

    layer: int
    batch: int
    head: int
    retrieved: int  # times it was retrieved before being dropped
    positions: torch.Tensor  # [chunk_size] stream positions of its tokens

    def as_dict(self) -> dict:
        return {"layer": self.layer, "batch": self.batch, "head": self.head, "retrieved": self.retrieved,
                "positions": self.positions.tolist()}

class Retrieved:
    """Tokens retrieved for one layer, on the attention's device: ``keys [b, h, r, d]``, ``values``,
    ``valid`` bool ``[b, h, r]`` (False: padding of streams that retrieved fewer tokens); ``positions``
    ``[b, h, r]`` (host) are their stream positions (-1 for padding), valid tokens first in stream order."""

    def __init__(self, keys, values, valid, positions=None):
        self.keys, self.values, self.valid = keys, values, valid
        self.positions = positions
        self.all_valid = bool(valid.all())

    @property
    def size(self) -> int:
        return self.keys.shape[2]

    def to(self, device) -> "Retrieved":
        if self.keys.device == torch.device(device):
            return self
        return Retrieved(self.keys.to(device), self.values.to(device), self.valid.to(device), self.positions)

    def attend(self, query, keys, values, *, key_valid=None, rows=None, **kwargs):
        """:func:`tokenmem.kernels.attention_with_stats` over ``[retrieved, live]`` keys; the mass and the
        ``rows`` (filled in place) cover the live keys only."""
        b, h, n = keys.shape[0], keys.shape[1], keys.shape[2]
        r = self.size
        all_keys = torch.cat([self.keys.to(keys.dtype), keys], dim=2)
        all_values = torch.cat([self.values.to(values.dtype), values], dim=2)
        valid = None
        if key_valid is not None or not self.all_valid:
            live = torch.ones(b, h, n, dtype=torch.bool, device=keys.device) if key_valid is None else key_valid.expand(b, h, n)
            valid = torch.cat([self.valid, live], dim=2)
        wide = None if rows is None else rows.new_zeros(*rows.shape[:3], r + n)
        out, mass = kernels.attention_with_stats(query, all_keys, all_values, key_valid=valid, rows=wide, **kwargs)
        if rows is not None:
            rows.copy_(wide[..., r:])
        return out, None if mass is None else mass[..., r:]


class LayerBank:
    """The bank of one layer: chunk slots ``[b, h, S, C, ...]`` per stream (host, or spilled), their
    representatives and counters, the pending buffer ``[b, h, P, ...]`` and the retrieved set."""

    def __init__(self, owner, index: int):  # owner: the MemoryBank
        self.owner, self.index = owner, index
        self.C = owner.options.chunk_size
        self.used = self.pn = None
        self.ck = self.cv = self.cm = None  # chunk keys/values/meta [b, h, S, C, ...] (None when spilled)
        self.active: Retrieved | None = None
        self.since = 0
        self.acc: torch.Tensor | None = None  # accumulated mass of the live slots [b, h, held] (device)
        self.next_order = 0

    @property
    def empty(self) -> bool:
        return self.used is None or (not bool(self.used.any()) and not bool((self.pn > 0).any()))

    @property
    def S(self) -> int:
        return 0 if self.used is None else self.used.shape[2]

    def host_bytes(self) -> int:
        tensors = [self.ck, self.cv, self.cm, self.cpos, self.rep, self.used, self.order, self.hits, self.sfile,
                   self.srow, self.scrc, self.pk, self.pv, self.pm, self.pw, self.pn] if self.used is not None else []
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- allocation ---------------------------------------------------------------------------------
    def _init(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, _, d = keys.shape
        self.b, self.h, self.d, self.dv, self.dtype = b, h, d, values.shape[-1], keys.dtype
        self.used = torch.zeros(b, h, 0, dtype=torch.bool)
        self.ck = self.cv = self.cm = None
        self.cpos = torch.zeros(b, h, 0, self.C, dtype=torch.long)
        self.rep = torch.zeros(b, h, 0, d)
        self.order = torch.zeros(b, h, 0, dtype=torch.long)
        self.hits = torch.zeros(b, h, 0, dtype=torch.long)
        self.sfile = self.srow = self.scrc = None
        if self.owner.spill is None:
            self.ck = torch.zeros(b, h, 0, self.C, d, dtype=self.dtype)
            self.cv = torch.zeros(b, h, 0, self.C, self.dv, dtype=self.dtype)
            self.cm = torch.zeros(b, h, 0, self.C, FIELDS, dtype=torch.long)
        else:
            self.sfile = torch.zeros(b, h, 0, dtype=torch.long)
            self.srow = torch.zeros(b, h, 0, dtype=torch.long)
            self.scrc = torch.zeros(b, h, 0, dtype=torch.long)
        self.pk = torch.zeros(b, h, self.C, d, dtype=self.dtype)
        self.pv = torch.zeros(b, h, self.C, self.dv, dtype=self.dtype)
        self.pm = torch.zeros(b, h, self.C, FIELDS, dtype=torch.long)
        self.pw = torch.zeros(b, h, self.C)
        self.pn = torch.zeros(b, h, dtype=torch.long)

    _SLOT_FIELDS = ("used", "ck", "cv", "cm", "cpos", "rep", "order", "hits", "sfile", "srow", "scrc")
    _PENDING_FIELDS = ("pk", "pv", "pm", "pw")

    def _grow_slots(self, slots: int) -> None:
        for name in self._SLOT_FIELDS:
            t = getattr(self, name)
            if t is not None:
                grown = t.new_zeros(t.shape[0], t.shape[1], slots, *t.shape[3:])
                grown[:, :, : t.shape[2]] = t
                setattr(self, name, grown)

    def _grow_pending(self, capacity: int) -> None:
        for name in self._PENDING_FIELDS:
            t = getattr(self, name)
            grown = t.new_zeros(t.shape[0], t.shape[1], capacity, *t.shape[3:])
            grown[:, :, : t.shape[2]] = t
            setattr(self, name, grown)

    # -- capture ----------------------------------------------------------------------------------
    def observe(self, mass: torch.Tensor) -> None:
        b, h, n = mass.shape
        if self.acc is None or self.acc.shape[:2] != (b, h):
            self.acc = torch.zeros(b, h, n, device=mass.device)
        elif self.acc.shape[2] < n:  # the call appended tokens
            self.acc = torch.cat([self.acc, self.acc.new_zeros(b, h, n - self.acc.shape[2])], dim=2)
        self.acc = self.acc.to(mass.device)
        self.acc += mass

    def capture(self, layer, index: torch.Tensor, kept_ok: torch.Tensor | None) -> None:
        n = layer.held
        meta = layer.packed_meta  # [b, h, n, F]
        valid = (meta[..., FLAGS] & PAD) == 0
        stay = torch.zeros_like(valid)
        stay.scatter_(2, index, True if kept_ok is None else kept_ok)
        dropped = valid & ~stay  # real tokens leaving the live cache (or masked by a ragged decision)
        weight = None
        if self.acc is not None and self.acc.shape[2] == n:
            weight = self.acc
            self.acc = kernels.gather_tokens(self.acc, index)
        count = dropped.sum(-1)  # [b, h]
        most = int(count.max()) if count.numel() else 0
        if most == 0:
            return
        slots = torch.sort((~dropped).to(torch.int8), dim=-1, stable=True).indices[..., :most]  # dropped first
        keys = kernels.gather_tokens(layer.keys, slots).cpu()
        values = kernels.gather_tokens(layer.values, slots).cpu()
        packed = kernels.gather_tokens(meta, slots).cpu()
        w = torch.zeros(slots.shape) if weight is None else torch.gather(weight, 2, slots).float().cpu()
        if self.used is None:
            self._init(keys, values)
        elif (keys.shape[0], keys.shape[1]) != (self.b, self.h):
            raise TokenmemError(f"memory bank layer {self.index}: the memory now holds {keys.shape[0]} x "
                                f"{keys.shape[1]} streams but the bank {self.b} x {self.h}; call memory.reset()")
        count = count.cpu()
        need = int((self.pn + count).max())
        if need > self.pk.shape[2]:
            self._grow_pending(max(need, self.pk.shape[2] * 5 // 4 + self.C))
        ok = torch.arange(most)[None, None] < count[..., None]  # [b, h, most]
        bi, hi, ti = ok.nonzero(as_tuple=True)
        dest = self.pn[bi, hi] + ti
        self.pk[bi, hi, dest] = keys[bi, hi, ti]
        self.pv[bi, hi, dest] = values[bi, hi, ti]
        self.pm[bi, hi, dest] = packed[bi, hi, ti]
        self.pw[bi, hi, dest] = w[bi, hi, ti]
        self.pn += count
        self._flush()

    def _flush(self) -> None:
        """Move every complete chunk from the pending buffer into a chunk slot (spilled when configured)."""
        C = self.C
        full = self.pn // C  # [b, h] complete chunks per stream
        if int(full.max()) == 0:
            return
        kept, drops = self._place(full)
        owner = self.owner
        for b, h, slot, j, hits in drops:  # log them before their slots are reused
            positions = self.cpos[b, h, slot].clone() if slot is not None else self.pm[b, h, j * C : (j + 1) * C, POSITION].clone()
            owner.dropped.append(DroppedChunk(self.index, b, h, hits, positions))
            if slot is not None:
                self.used[b, h, slot] = False
                if owner.spill is not None:
                    owner.spill.release([int(self.sfile[b, h, slot])])
        owner.dropped_chunks += len(drops)
        owner.dropped_tokens += len(drops) * C
        if kept:
            bi, hi, ji, si, order = torch.tensor(kept, dtype=torch.long).T
            tok = ji[:, None] * C + torch.arange(C)  # [m, C] pending slots of each chunk
            k, v = self.pk[bi[:, None], hi[:, None], tok], self.pv[bi[:, None], hi[:, None], tok]
            m, w = self.pm[bi[:, None], hi[:, None], tok], self.pw[bi[:, None], hi[:, None], tok]
            self.used[bi, hi, si] = True
            self.cpos[bi, hi, si] = m[..., POSITION]
            self.rep[bi, hi, si] = self._representative(k, m, w)
            self.order[bi, hi, si] = order
            self.hits[bi, hi, si] = 0
            if self.ck is not None:
                self.ck[bi, hi, si], self.cv[bi, hi, si], self.cm[bi, hi, si] = k, v, m
            else:
                owner.spill.write(self, bi, hi, si, k, v, m)
        self.next_order += int(full.max())
        shift = full * C  # the rest of each stream's pending tokens moves to the front
        idx = (torch.arange(self.pk.shape[2])[None, None] + shift[..., None]).clamp(max=self.pk.shape[2] - 1)
        for name in self._PENDING_FIELDS:
            setattr(self, name, kernels.gather_tokens(getattr(self, name), idx))
        self.pn -= shift
        keep = max(2 * C, int(self.pn.max()) + C)
        if self.pk.shape[2] > 2 * keep:  # give back what a long prefill's eviction took
            for name in self._PENDING_FIELDS:
                setattr(self, name, getattr(self, name)[:, :, :keep].clone())

    def _place(self, full: torch.Tensor):
        """Slots for the ``full[b, h]`` new chunks of each stream, inserted one after the other; when a stream
        holds ``max_chunks``, each insertion first drops its least-retrieved chunk, ties to the oldest
        (MemLong's counter; a new chunk not yet retrieved can go when the next one arrives).

        Returns ``kept``: ``(b, h, j, slot, order)`` of the new chunks that stay, and ``drops``:
        ``(b, h, slot or None, j or None, retrieved)`` of the chunks dropped (an old slot, or new chunk ``j``)."""
        limit = self.owner.options.max_chunks
        need = int((self.used.sum(-1) + full).max())
        need = need if limit is None else min(need, limit)
        if need > self.S:
            grow = max(need, self.S + self.S // 4)
            self._grow_slots(grow if limit is None else min(limit, grow))
        kept, drops = [], []
        for b, h in full.nonzero().tolist():
            slots = self.used[b, h].nonzero()[:, 0].tolist()
            hits, order = self.hits[b, h].tolist(), self.order[b, h].tolist()
            present = {s: (hits[s], order[s], None) for s in slots}  # slot -> (hits, order, new chunk j)
            free = (~self.used[b, h]).nonzero()[:, 0].tolist()  # ascending: a heap
            for j in range(int(full[b, h])):
                if limit is not None and len(present) >= limit:
                    victim = min(present, key=lambda s: present[s][:2])
                    n_hits, _, new = present.pop(victim)
                    drops.append((b, h, victim if new is None else None, new, n_hits))
                    heapq.heappush(free, victim)
                slot = heapq.heappop(free)
                present[slot] = (0, self.next_order + j, j)
            kept += [(b, h, j, slot, o) for slot, (_, o, j) in present.items() if j is not None]
        return kept, drops

    def _representative(self, k: torch.Tensor, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``[m, d]`` representative keys of chunks ``k [m, C, d]`` (meta ``m``, accumulated mass ``w``)."""
        inv_freq = self.owner.rotation()
        if inv_freq is not None:  # shift mode: compare content at one position (0), not eviction slots
            k = rotate_by(k, -m[..., ROPE], inv_freq)
        k = k.float()
        if self.owner.options.representative == "top":
            return k[torch.arange(k.shape[0]), w.argmax(-1)]
        return k.mean(dim=1)  # "mean" (and "max", which scores every key but keeps the mean for inspection)

    # -- retrieval ----------------------------------------------------------------------------------
    def retrieve(self, query: torch.Tensor, query_valid: torch.Tensor | None) -> Retrieved:
        every = self.owner.options.retrieve_every
        q = query.shape[2]
        if self.active is not None and q == 1 and self.since < every - 1:
            self.since += 1
            self.active = self.active.to(query.device)
            return self.active
        self.since = 0
        self.active = None  # release the previous set before building the next one
        self.active = self._select(query, query_valid)
        self.owner.refreshes += 1
        return self.active

    def _mean_query(self, query: torch.Tensor, query_valid: torch.Tensor | None) -> torch.Tensor:
        """``[b, h, d]`` (host, float32): the mean of the call's valid queries over the KV head's query group."""
        recent = self.owner.options.recent_queries
        if recent is not None and query.shape[2] > recent:
            query = query[:, :, -recent:]
            query_valid = None if query_valid is None else query_valid[:, -recent:]
        b, hq, q, d = query.shape
        g = hq // self.h
        qf = query.float().reshape(b, self.h, g, q, d)
        if query_valid is None:
            return qf.mean(dim=(2, 3)).cpu()
        w = query_valid.to(qf.dtype)[:, None, None, :, None]
        total = (qf * w).sum(dim=(2, 3))
        return (total / (g * query_valid.sum(-1)).clamp(min=1)[:, None, None].to(qf.dtype)).cpu()

    def _pending_rep(self) -> torch.Tensor:
        """``[b, h, d]`` representatives of the pending partial chunks (zeros where a stream has none)."""
        P = self.pk.shape[2]
        ok = torch.arange(P)[None, None] < self.pn[..., None]  # [b, h, P]
        k = self.pk
        inv_freq = self.owner.rotation()
        if inv_freq is not None:
            k = rotate_by(k, torch.where(ok, -self.pm[..., ROPE], 0), inv_freq)
        k = k.float() * ok[..., None]
        if self.owner.options.representative != "top":
            return k.sum(2) / self.pn.clamp(min=1)[..., None]
        top = torch.where(ok, self.pw, float("-inf")).argmax(-1)  # [b, h]
        return torch.gather(k, 2, top[..., None, None].expand(-1, -1, 1, k.shape[-1]))[:, :, 0]

    def _max_scores(self, qm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``representative="max"``: each chunk scores the best match of the query ``qm [b, h, d]`` among all
        of its keys (exact maximum inner product over the chunk, as attention itself would pick), the
        pending partial chunk likewise; returns ``([b, h, S], [b, h])`` with -inf for empty slots."""
        inv_freq = self.owner.rotation()
        keys = self.ck.float()  # [b, h, S, C, d]
        P = self.pk.shape[2]
        ok = torch.arange(P)[None, None] < self.pn[..., None]  # [b, h, P]
        pending = self.pk.float()
        if inv_freq is not None:  # shift mode: compare content at one position (0), not eviction slots
            keys = rotate_by(keys, -self.cm[..., ROPE], inv_freq)
            pending = rotate_by(pending, torch.where(ok, -self.pm[..., ROPE], 0), inv_freq)
        scores = torch.einsum("bhd,bhscd->bhsc", qm, keys).amax(dim=-1).masked_fill(~self.used, float("-inf"))
        pend = torch.einsum("bhd,bhpd->bhp", qm, pending).masked_fill(~ok, float("-inf")).amax(dim=-1)
        return scores, pend

    def _select(self, query: torch.Tensor, query_valid: torch.Tensor | None) -> Retrieved:
        C, S = self.C, self.S
        qm = self._mean_query(query, query_valid).float()  # [b, h, d]
        if self.owner.options.representative == "max":
            scores, pend = self._max_scores(qm)
        else:
            scores = torch.einsum("bhd,bhsd->bhs", qm, self.rep).masked_fill(~self.used, float("-inf"))
            pend = (qm * self._pending_rep()).sum(-1).masked_fill(self.pn == 0, float("-inf"))
        scores = torch.cat([scores, pend[..., None]], dim=-1)  # candidate S = the pending chunk
        top = scores.topk(min(self.owner.options.retrieve, S + 1), dim=-1)
        ok = top.values > float("-inf")  # [b, h, k]
        is_pending = top.indices == S
        slot = top.indices.clamp(max=max(S - 1, 0))
        b, h, k = slot.shape
        from_chunk = ok & ~is_pending
        keys = torch.zeros(b, h, k, C, self.d, dtype=self.dtype)
        values = torch.zeros(b, h, k, C, self.dv, dtype=self.dtype)
        meta = torch.zeros(b, h, k, C, FIELDS, dtype=torch.long)
        cb, ch, ck = from_chunk.nonzero(as_tuple=True)
        cs = slot[cb, ch, ck]
        if self.ck is not None:
            keys[cb, ch, ck], values[cb, ch, ck], meta[cb, ch, ck] = self.ck[cb, ch, cs], self.cv[cb, ch, cs], self.cm[cb, ch, cs]
        elif len(cb):
            keys[cb, ch, ck], values[cb, ch, ck], meta[cb, ch, ck] = self.owner.spill.read(self, cb, ch, cs)
        self.hits.index_put_((cb, ch, cs), torch.ones_like(cs), accumulate=True)
        valid = from_chunk[..., None].expand(b, h, k, C).clone()
        pb, ph, pk = (ok & is_pending).nonzero(as_tuple=True)
        if len(pb):
            keys[pb, ph, pk] = self.pk[pb, ph, :C]
            values[pb, ph, pk] = self.pv[pb, ph, :C]
            meta[pb, ph, pk] = self.pm[pb, ph, :C]
            valid[pb, ph, pk] = torch.arange(C)[None] < self.pn[pb, ph][:, None]
        keys, values = keys.reshape(b, h, k * C, self.d), values.reshape(b, h, k * C, self.dv)
        meta, valid = meta.reshape(b, h, k * C, FIELDS), valid.reshape(b, h, k * C)
        # valid tokens first, in stream order; trim the padding every stream has
        position = torch.where(valid, meta[..., POSITION], torch.iinfo(torch.long).max)
        order = torch.sort(position, dim=-1, stable=True).indices
        r = valid.sum(-1)  # [b, h]
        width = max(int(r.max()), 1)
        order = order[..., :width]
        keys, values = kernels.gather_tokens(keys, order), kernels.gather_tokens(values, order)
        meta, valid = kernels.gather_tokens(meta, order), torch.gather(valid, 2, order)
        inv_freq = self.owner.rotation()
        if inv_freq is not None:  # shift mode: "before" the cache (-r .. -1) or all at position 0 ("zero")
            if self.owner.options.placement == "before":
                target = torch.arange(width)[None, None] - r[..., None]  # -r .. -1 for the valid tokens
            else:
                target = torch.zeros(1, 1, width, dtype=torch.long)
            keys = rotate_by(keys, torch.where(valid, target - meta[..., ROPE], 0), inv_freq)
        device = query.device
        positions = torch.where(valid, meta[..., POSITION], -1)
        return Retrieved(keys.to(device), values.to(device), valid.to(device), positions)

    # -- batch selection, inspection -------------------------------------------------------------------
    def select_batch(self, index: torch.Tensor) -> None:
        index = index.cpu()
        if self.used is not None:
            for name in self._SLOT_FIELDS + self._PENDING_FIELDS + ("pn",):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t[index])
            self.b = self.used.shape[0]
        if self.acc is not None:
            self.acc = self.acc[index.to(self.acc.device)]
        self.active = None  # the next call retrieves for the new rows

    def contents(self, batch: int, head: int):
        if self.used is None:
            return None
        slots = self.used[batch, head].nonzero()[:, 0]
        if self.ck is not None:
            keys, values, meta = self.ck[batch, head, slots], self.cv[batch, head, slots], self.cm[batch, head, slots]
        else:
            n = len(slots)
            keys, values, meta = self.owner.spill.read(self, torch.full((n,), batch), torch.full((n,), head), slots)
        p = int(self.pn[batch, head])
        keys = torch.cat([keys.reshape(-1, self.d), self.pk[batch, head, :p]])
        values = torch.cat([values.reshape(-1, self.dv), self.pv[batch, head, :p]])
        meta = torch.cat([meta.reshape(-1, FIELDS), self.pm[batch, head, :p]])
        order = torch.argsort(meta[:, POSITION], stable=True)
        return keys[order], values[order], meta[order]
