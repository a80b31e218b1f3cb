"""Files tokenmem writes and reads back: atomic writes, checksummed checkpoints, checked model weights.

- :func:`atomic_write`: a temporary file in the same directory, flushed to disk, then renamed over the
  target, so a process killed at any point leaves either the old file or the new one, never a mix.
- Checkpoints (:func:`save_torch` / :func:`load_torch`, :func:`save_pickle` / :func:`load_pickle`): the
  serialised bytes are followed by a trailer, ``TRAILER`` + the SHA-256 of those bytes. Neither format reads
  past its own end (``torch.load`` finds its zip directory, ``pickle`` stops at its STOP opcode), so sealed
  files still load with plain ``torch.load`` / ``pickle.load``, and files written before the trailer existed
  load here unchecked. A truncated file, a flipped bit, or anything that does not parse raises
  :class:`~tokenmem.errors.CorruptFileError` naming the file, before the caller has changed anything.
- :func:`check_safetensors` / :func:`check_weights_dir`: a ``.safetensors`` file's header parses and covers the
  file (a truncated or cut-short copy is caught; safetensors has no checksum, so a flipped bit inside a tensor
  is not).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

from .errors import CorruptFileError

TRAILER = b"\ntokenmem-sha256:"
_DIGEST = 32


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    The temporary file is ``.<name>.tmp<pid>`` beside the target; it is removed when the write fails, and a
    temporary file that a killed writer left behind (its process is gone, and it is older than
    :data:`STALE_SECONDS`) is removed by the next successful write of the same target."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    remove_stale_temporaries(path)


STALE_SECONDS = 60.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` for ``path`` that a killed writer left behind: no
    process with their pid runs here and they are older than :data:`STALE_SECONDS` (a writer on another host
    of a shared file system keeps its file for that long). Returns what was removed."""
    import glob
    import time

    path = Path(path)
    prefix = f".{path.name}.tmp"
    removed = []
    for candidate in path.parent.glob(glob.escape(prefix) + "*"):
        pid = candidate.name[len(prefix) :]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            if time.time() - candidate.stat().st_mtime < STALE_SECONDS:
                continue
            candidate.unlink()
        except FileNotFoundError:
            continue
        removed.append(candidate)
    return removed


def seal(data: bytes) -> bytes:
    """``data`` followed by the checksum trailer."""
    return data + TRAILER + hashlib.sha256(data).digest()


def unseal(data: bytes, path, fix: str) -> bytes:
    """The payload of sealed ``data`` after checking its checksum (unsealed data is returned as it is)."""
    end = len(data) - _DIGEST - len(TRAILER)
    if end < 0 or data[end : end + len(TRAILER)] != TRAILER:
        return data
    payload = data[:end]
    if hashlib.sha256(payload).digest() != data[end + len(TRAILER) :]:
        raise CorruptFileError(f"{path} is corrupt: its contents do not match the checksum written with them "
                               f"(a damaged disk or copy); {fix}", path)
    return payload


def _read(path, what: str, fix: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptFileError(f"cannot read the {what} {path}: {exc}; {fix}", path) from exc


def save_torch(obj, path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, sealed with a checksum."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, seal(buffer.getvalue()))


def load_torch(path, what: str = "checkpoint", fix: str = "delete it to start again, or restore a copy"):
    """``torch.load`` (full unpickling: files tokenmem wrote itself) of a file :func:`save_torch` wrote (or an
    unsealed one); :class:`CorruptFileError` naming the file when it is truncated, damaged or unreadable."""
    import torch

    payload = unseal(_read(path, what, fix), path, fix)
    try:
        return torch.load(io.BytesIO(payload), weights_only=False)
    except Exception as exc:  # torch/zip/pickle raise many types for a damaged file; all mean the same here
        raise CorruptFileError(f"the {what} {path} is truncated or corrupt and cannot be loaded "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {fix}",
                               path) from exc


def save_pickle(obj, path) -> None:
    """Pickle ``obj`` to ``path`` atomically, sealed with a checksum."""
    atomic_write(path, seal(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))


def load_pickle(path, what: str = "checkpoint", fix: str = "delete it to start again, or restore a copy"):
    """Unpickle a file :func:`save_pickle` wrote (or an unsealed pickle), checked as :func:`load_torch`."""
    payload = unseal(_read(path, what, fix), path, fix)
    try:
        return pickle.loads(payload)
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... for a damaged pickle
        raise CorruptFileError(f"the {what} {path} is truncated or corrupt and cannot be loaded "
                               f"({type(exc).__name__}: {exc}); {fix}", path) from exc


def check_safetensors(path, fix: str = "save or copy the file again") -> None:
    """Raise :class:`CorruptFileError` unless ``path``'s safetensors header parses and covers the whole file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # SafetensorError (header too small, incomplete metadata, invalid JSON), OSError
        raise CorruptFileError(f"{path} is not a complete safetensors file ({exc}); the file is truncated or "
                               f"corrupt: {fix}", path) from exc


def check_weights_dir(path, fix: str = "save the model again (model.save_pretrained) or copy it again") -> None:
    """:func:`check_safetensors` on every ``*.safetensors`` file of a ``from_pretrained`` directory."""
    for file in sorted(Path(path).glob("*.safetensors")):
        check_safetensors(file, fix)


def load_pretrained(load, path, *args, **kwargs):
    """``load(path, *args, **kwargs)`` (a ``from_pretrained``) after :func:`check_weights_dir`; the ``OSError`` s
    ``from_pretrained`` raises for missing or unparsable files become :class:`CorruptFileError` naming ``path``."""
    check_weights_dir(path)
    try:
        return load(path, *args, **kwargs)
    except OSError as exc:  # transformers: "no file named ...", "... is not a valid JSON file", ...
        raise CorruptFileError(f"cannot load the model directory {path}: {exc}", path) from exc


def trim_jsonl(path, step: int, what: str = "training log") -> list[dict]:
    """Keep the records of a JSON-lines log whose ``"step"`` is at most ``step`` (the steps a resumed checkpoint
    includes) and return them. A last line cut short (a process killed while writing it) is dropped; an
    unparsable line before the end raises :class:`CorruptFileError`."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break  # the record being written when the run was killed
            raise CorruptFileError(f"the {what} {path} is corrupt at line {i + 1} ({exc}); repair or delete that "
                                   "line to resume", path) from exc
        if record["step"] <= step:
            kept.append((line, record))
    atomic_write(path, "".join(line + "\n" for line, _ in kept).encode())
    return [record for _, record in kept]
