"""Spill files of the memory bank (:mod:`tokenmem.bank`): chunks written with safetensors, read back
memory-mapped, each checked against the CRC-32 kept in memory."""

from __future__ import annotations

import shutil
import tempfile
import weakref
import zlib
from pathlib import Path

import torch

from tokenmem.errors import TokenmemError
from tokenmem.meta import FIELDS


class BankError(TokenmemError):
    """A memory-bank spill file that is missing, truncated or corrupt (its tokens cannot be attended)."""


class Spill:
    """Chunk files of one bank: ``layer{L}-{n}.safetensors`` with ``keys [m, C, d]``, ``values``, ``meta``
    (one file per layer and flush), read memory-mapped; a CRC-32 per chunk and the size per file are kept."""

    def __init__(self, root):
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix="bank-", dir=root))
        except OSError as exc:
            raise BankError(f"cannot create the memory-bank spill directory under {root} ({exc}); pass a writable "
                            "spill_dir or spill_dir=None to keep the bank in host memory") from exc
        self.files: dict[int, tuple[Path, int]] = {}  # file id -> (path, size in bytes)
        self.refs: dict[int, int] = {}  # file id -> chunks still in use
        self.next_id = 0
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    @staticmethod
    def _crc(k: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> int:
        crc = 0
        for t in (k, v, m):
            crc = zlib.crc32(t.contiguous().view(torch.uint8).numpy(), crc)
        return crc

    def write(self, bank, bi, hi, si, k, v, m) -> None:
        """Write the chunks ``k/v/m [n, C, ...]`` of slots ``(bi, hi, si)`` to one new file."""
        from safetensors.torch import save_file

        fid = self.next_id
        self.next_id += 1
        path = self.dir / f"layer{bank.index}-{fid}.safetensors"
        try:
            save_file({"keys": k.contiguous(), "values": v.contiguous(), "meta": m.contiguous()}, str(path),
                      metadata={"layer": str(bank.index)})
        except (OSError, RuntimeError) as exc:
            raise BankError(f"cannot write memory-bank spill file {path} ({exc}); free disk space or pass another "
                            "spill_dir (or spill_dir=None to keep the bank in host memory)") from exc
        self.files[fid] = (path, path.stat().st_size)
        bank.sfile[bi, hi, si] = fid
        bank.srow[bi, hi, si] = torch.arange(len(bi))
        bank.scrc[bi, hi, si] = torch.tensor([self._crc(k[i], v[i], m[i]) for i in range(len(bi))], dtype=torch.long)
        self.refs[fid] = len(bi)

    def read(self, bank, bi: torch.Tensor, hi: torch.Tensor, slot: torch.Tensor):
        """Keys, values and meta ``[m, C, ...]`` of the chunks at ``(bi, hi, slot)``, checked against their CRC."""
        from safetensors import safe_open

        m = len(bi)
        keys = torch.zeros(m, bank.C, bank.d, dtype=bank.dtype)
        values = torch.zeros(m, bank.C, bank.dv, dtype=bank.dtype)
        meta = torch.zeros(m, bank.C, FIELDS, dtype=torch.long)
        fids, rows, crcs = bank.sfile[bi, hi, slot].tolist(), bank.srow[bi, hi, slot].tolist(), bank.scrc[bi, hi, slot].tolist()
        by_file: dict[int, list[int]] = {}
        for i, fid in enumerate(fids):
            by_file.setdefault(fid, []).append(i)
        for fid, items in by_file.items():
            path, size = self.files.get(fid, (None, 0))

            def fail(problem, cause=None, path=path):
                raise BankError(
                    f"memory-bank spill file {path} (layer {bank.index}) is {problem}: its chunks cannot be attended. "
                    "Something modified the spill directory or the disk is failing; keep spill_dir on a local disk "
                    "nothing else writes to, and start again with a new TokenMemory (or memory.reset())"
                ) from cause

            if path is None:
                fail("unknown (released)")
            try:
                actual = path.stat().st_size
            except OSError as exc:
                fail("missing", exc)
            if actual != size:
                fail(f"truncated or extended ({actual} bytes, {size} written)")
            try:
                with safe_open(str(path), framework="pt") as f:
                    ks, vs, ms = f.get_slice("keys"), f.get_slice("values"), f.get_slice("meta")
                    for i in items:
                        r = rows[i]
                        keys[i], values[i], meta[i] = ks[r : r + 1][0], vs[r : r + 1][0], ms[r : r + 1][0]
            except Exception as exc:  # safetensors raises its own error type for unreadable files
                fail(f"unreadable ({type(exc).__name__}: {exc})", exc)
            for i in items:
                if self._crc(keys[i], values[i], meta[i]) != crcs[i]:
                    fail(f"corrupt (checksum mismatch in row {rows[i]})")
        return keys, values, meta

    def release(self, fids: list[int]) -> None:
        for fid in fids:
            self.refs[fid] -= 1
            if self.refs[fid] == 0:
                self._delete(fid)

    def recount(self, banks) -> None:
        """Recount the chunks using each file (after batch selection duplicated or removed streams)."""
        refs = {fid: 0 for fid in self.files}
        for bank in banks:
            if bank.sfile is not None:
                for fid in bank.sfile[bank.used].tolist():
                    refs[fid] += 1
        self.refs = refs
        for fid, count in list(refs.items()):
            if count == 0:
                self._delete(fid)

    def _delete(self, fid: int) -> None:
        path, _ = self.files.pop(fid)
        self.refs.pop(fid, None)
        path.unlink(missing_ok=True)

    def bytes(self) -> int:
        return sum(size for _, size in self.files.values())

    def clear(self) -> None:
        for fid in list(self.files):
            self._delete(fid)
