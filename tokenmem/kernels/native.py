"""The CPU backend's compiled kernel: the fused per-key attention mass (``colmass.cpp``), built at first use.

``colmass.cpp`` is compiled once per machine with the system C++ compiler (``$CXX``, else ``c++`` / ``g++`` /
``clang++``; ``-O3 -march=native``, about 2 s) into ``$TOKENMEM_CACHE/kernels`` (default
``~/.cache/tokenmem/kernels``) as ``colmass-<cpu kind>-<hash>.so`` (the CPU kind hashes the machine and CPU flags
``-march=native`` builds for; the hash covers the source, the flags, the compiler's version and the CPU kind), and
loaded with :mod:`ctypes` (calls release the GIL). Nothing of PyTorch is linked. Building or finding the current file
removes the builds it replaces: the other ``colmass-<cpu kind>-*.so`` of this CPU kind and the files of the earlier
naming (``colmass-<hash>.so``), once they are ten minutes old; builds for other CPU kinds (a cache shared by
different machines) are kept. A process that already loaded a removed file keeps its mapping; a file another process
removed first is skipped.

Threads: the kernel keeps one pool of worker threads per process, started lazily (as many as calls have asked
for) and reused by every later call; threads are never created per call. A call uses ``torch.get_num_threads()``
threads (read at the call), its own included, capped by the pool's size: ``TOKENMEM_NATIVE_THREADS`` when set (a
positive integer, read when the pool is made, i.e. at the first call that wants helper threads), else the number
of CPUs. Concurrent calls (several Python threads) share the pool: a call borrows only idle workers and otherwise
runs its tasks on its own thread, so the pool never holds more than ``size - 1`` threads however many calls run at
once. Results do not depend on how many threads ran (each key's sum is made by one task, in a fixed order). A
pool made before ``os.fork()`` is abandoned in the child (its threads do not exist there) and a new one is made;
at exit the parked workers end with the process. :func:`pool_stats` reports the pool's size and threads started.

When no compiler is found or the build fails, :func:`load` returns ``None`` after one warning that says why and
what to install; the CPU backend then computes the mass with PyTorch's flash kernel on the transposed problem
(correct, about 1.5x slower). ``TOKENMEM_NATIVE=0`` turns the compiled kernel off; ``TOKENMEM_NATIVE=require``
makes a failed build an error instead of a warning (CI uses it so that a broken build cannot pass unseen).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from ..errors import TokenmemError

SOURCE = Path(__file__).with_name("colmass.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-pthread"]
STALE_AFTER = 600.0  # seconds: a replaced build written more recently than this is left for a later clean-up
_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("TOKENMEM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tokenmem")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in filter(None, [os.environ.get("CXX"), "c++", "g++", "clang++"]):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _mode() -> str:
    mode = os.environ.get("TOKENMEM_NATIVE", "1").strip().lower()
    if mode not in ("0", "1", "require"):
        raise TokenmemError(f"TOKENMEM_NATIVE={mode!r}: use 1 (default: build at first use, warn if it cannot), "
                            "0 (never use the compiled kernel) or require (a failed build is an error)")
    return mode


def build(force: bool = False) -> Path:
    """Compile ``colmass.cpp`` (when not cached) and return the shared library's path; raises TokenmemError."""
    cxx = _compiler()
    if cxx is None:
        raise TokenmemError("no C++ compiler found (tried $CXX, c++, g++, clang++): install one "
                            "(Debian/Ubuntu: apt install g++) for the fused CPU attention-mass kernel")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise TokenmemError(f"the C++ compiler {cxx} does not run ({exc}); set CXX to a working one") from exc
    source = SOURCE.read_bytes()
    kind = _cpu_kind()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode() + kind.encode()).hexdigest()[:16]
    target = cache_dir() / f"colmass-{kind}-{digest}.so"
    if target.exists() and not force:
        _remove_stale(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise TokenmemError(f"building the fused CPU kernel failed ({cxx} {' '.join(FLAGS)} {SOURCE}):\n"
                                f"{proc.stderr.strip()[-2000:]}\nSet TOKENMEM_NATIVE=0 to use the PyTorch path")
        os.chmod(tmp, 0o755)  # mkstemp made it 0600: others sharing the cache must be able to load it
        os.replace(tmp, target)  # atomic: concurrent builders (torchrun ranks) each write their own temp file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _remove_stale(target)
    return target


def _cpu_kind() -> str:
    """The machine and CPU flags a ``-march=native`` build is made for (8 hex digits; part of the file name)."""
    return hashlib.sha256(platform.machine().encode() + _cpu_flags().encode()).hexdigest()[:8]


def _remove_stale(current: Path) -> None:
    """Delete the builds ``current`` replaces: the other ``colmass-<kind>-*.so`` of this CPU kind (earlier sources,
    flags or compilers) and files named as before CPU kinds were in the name (``colmass-<16 hex>.so``). Builds for
    other CPU kinds are kept (a cache shared by different machines would otherwise rebuild on every switch), and so
    is ``current``. So is a file written in the last :data:`STALE_AFTER` seconds: a process of another tokenmem
    version may have just built it and be about to load it. Races with other processes are ignored: a file already
    gone or not removable is skipped."""
    kind = current.name.split("-")[1]
    for path in current.parent.glob("colmass-*.so"):
        if path.name == current.name:
            continue
        if path.name.startswith(f"colmass-{kind}-") or re.fullmatch(r"colmass-[0-9a-f]{16}\.so", path.name):
            try:
                if time.time() - path.stat().st_mtime >= STALE_AFTER:
                    path.unlink()
            except OSError:  # removed by a concurrent process first, or not ours to remove
                pass


def _bind(path: Path):
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.tokenmem_colmass_f32
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_float, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    for name in ("tokenmem_pool_capacity", "tokenmem_pool_started"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ctypes.c_int
    _libs[id(fn)] = lib  # the library keeps fn alive (ctypes caches it), so the id stays its own
    return fn


_libs: dict[int, ctypes.CDLL] = {}  # id of a bound colmass function -> its library (for the pool queries)


def pool_stats(fn=None) -> dict | None:
    """The compiled kernel's thread pool in this process: ``size`` (most threads one call uses, its own included;
    None before the first call that wanted helper threads) and ``started`` (worker threads created so far: it only
    grows up to ``size - 1``, whatever the number of calls). None when the compiled kernel is not available."""
    fn = fn or load()
    if fn is None:
        return None
    lib = _libs[id(fn)]
    capacity = lib.tokenmem_pool_capacity()
    return {"size": None if capacity < 0 else capacity + 1, "started": lib.tokenmem_pool_started()}


def _threads() -> int:
    """Threads a call asks for: torch's intra-op count (the kernel caps it by its pool, TOKENMEM_NATIVE_THREADS)."""
    env = os.environ.get("TOKENMEM_NATIVE_THREADS", "").strip()
    if env and (not env.isdigit() or int(env) < 1):
        raise TokenmemError(f"TOKENMEM_NATIVE_THREADS={env!r}: use a positive integer (the most threads the fused "
                            "CPU kernel runs at once in this process), or unset it for the number of CPUs")
    return max(1, torch.get_num_threads())


def load():
    """The compiled ``tokenmem_colmass_f32`` function, or None (compiled kernel off or not buildable)."""
    mode = _mode()
    if mode == "0":
        return None
    with _lock:
        if mode not in _state:
            try:
                try:
                    _state[mode] = _bind(build())
                except OSError:  # the file went away between build() and loading it (removed as stale by a
                    _state[mode] = _bind(build())  # process of another tokenmem version): build it once more
            except (TokenmemError, OSError) as exc:
                if mode == "require":
                    raise TokenmemError(f"TOKENMEM_NATIVE=require but the fused CPU kernel is unavailable: {exc}") \
                        from exc
                warnings.warn(f"tokenmem: the fused CPU attention-mass kernel is unavailable, using the slower "
                              f"PyTorch path ({exc})", RuntimeWarning, stacklevel=3)
                _state[mode] = None
        return _state[mode]


def colmass(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scaling: float, causal: bool,
            fn=None, out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor | None:
    """Per-key mass ``[b, hkv, n]`` (float32) = mean over a KV head's query heads of ``sum_i exp(s_ij - lse_i)``.

    ``query [b, hq, q, d]``, ``key [b, hkv, n, d]``, ``lse [b, hq, q]`` (+inf for a query that gives no mass).
    Causality is by cache slot as in the reference (query ``i`` sees keys ``j <= n - q + i``). ``out``: a
    contiguous float32 ``[b, hkv, n]`` to write into (every element is written). ``threads``: the most threads the
    call uses, its own included (default ``torch.get_num_threads()``; the kernel's pool caps it, see the module
    docstring). Returns None when the compiled kernel is not available (the caller takes the PyTorch path).
    """
    fn = fn or load()
    if fn is None:
        return None
    if (query.dim() != 4 or key.dim() != 4 or key.shape[0] != query.shape[0] or key.shape[3] != query.shape[3]
            or key.shape[1] == 0 or query.shape[1] % key.shape[1] or (causal and key.shape[2] < query.shape[2])
            or tuple(lse.shape) != tuple(query.shape[:3]) or {t.device.type for t in (query, key, lse)} != {"cpu"}):
        raise TokenmemError(f"colmass: CPU query [b, hq, q, d], key [b, hkv, n, d] (n >= q when causal) and lse "
                            f"[b, hq, q] with hq a multiple of hkv, got {tuple(query.shape)}, {tuple(key.shape)}, "
                            f"{tuple(lse.shape)}")
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    query = query.to(torch.float32)
    key = key.to(torch.float32)
    lse = lse.to(torch.float32)
    if bool(torch.isneginf(lse).any()):  # a query that sees no key attends to nothing (as in the reference)
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    mass = torch.empty(b, hkv, n, dtype=torch.float32) if out is None else out
    if mass.shape != (b, hkv, n) or mass.dtype != torch.float32 or not mass.is_contiguous():
        raise TokenmemError(f"colmass: out must be a contiguous float32 [{b}, {hkv}, {n}], got "
                            f"{tuple(mass.shape)} {mass.dtype}")
    if mass.numel() == 0 or q == 0:
        return mass.zero_()
    status = fn(query.data_ptr(), query.stride(0), query.stride(1), query.stride(2),
                key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
                lse.data_ptr(), lse.stride(0), lse.stride(1), lse.stride(2),
                mass.data_ptr(), b, hkv, hq // hkv, q, n, d, float(scaling), int(bool(causal)),
                _threads() if threads is None else max(1, int(threads)))
    if status == -2:
        raise TokenmemError("the fused CPU kernel could not run (out of memory?); set TOKENMEM_NATIVE=0 "
                            "to use the PyTorch path")
    if status != 0:
        raise TokenmemError(f"the fused CPU kernel rejected the sizes b={b} hq={hq} hkv={hkv} q={q} n={n} d={d}")
    return mass
