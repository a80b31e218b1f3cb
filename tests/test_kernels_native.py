"""The compiled fused CPU kernel (tokenmem.kernels.native, colmass.cpp) equals the reference; it is built at first
use, and a missing or broken compiler gives a warning and the PyTorch path, or an error with TOKENMEM_NATIVE=require."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import tokenmem
from tokenmem.kernels import cpu, native, reference

from test_kernels import make_inputs, rel_err

# panel and tile edges: the kernel works on 2 * W keys per tile (W = 8 or 16 floats) and 4 tiles per panel
SIZES = [(1, 1), (7, 7), (1, 65), (65, 65), (31, 127), (128, 128), (129, 129), (100, 257), (1000, 1000)]
GROUPS = [(8, 8), (8, 4), (8, 2), (8, 1)]
LONG = {"block_q": 16, "block_k": 64}  # blocks this small send short test calls down the long-call (two-pass) path


def reference_mass(query, key, value, scaling, causal=True, query_valid=None):
    _, mass = reference.attention_with_stats(query.double(), key.double(), value.double(), scaling=scaling,
                                             causal=causal, query_valid=query_valid, need_mass=True)
    return mass


def lse_of(query, key, scaling, causal=True):
    """Row log-sum-exp [b, hq, q] in float64 (independent of pass 1's kernels)."""
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    k = key.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    if causal:
        s = s.masked_fill(torch.ones(q, n, dtype=torch.bool).triu(n - q + 1), float("-inf"))
    return torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("q,n", SIZES)
@pytest.mark.parametrize("hq,hkv", GROUPS)
@pytest.mark.parametrize("causal", [True, False])
def test_colmass_equals_reference(q, n, hq, hkv, causal):
    b, d = 2, 24
    query, key, value, _, _ = make_inputs(b, hq, hkv, q, n, d, torch.float32, False, seed=hash((q, n, hq, causal)) % 2**31)
    mass = torch.full((b, hkv, n), float("nan"))  # poisoned: every element must be written
    got = native.colmass(query, key, lse_of(query, key, d**-0.5, causal), d**-0.5, causal, out=mass)
    assert got is mass and torch.isfinite(mass).all()
    assert rel_err(mass, reference_mass(query, key, value, d**-0.5, causal)) < 1e-5


@pytest.mark.parametrize("d", [7, 64, 128])
def test_colmass_head_sizes_bf16_strided_query_and_padded_queries(d):
    b, hq, hkv, q, n = 2, 8, 2, 70, 200
    query, key, value, _, _ = make_inputs(b, hq, hkv, q, n, d, torch.float32, False, seed=d)
    # the layout transformers hands over: [b, q, hq, d] transposed to [b, hq, q, d] (not contiguous)
    strided = query.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    lse = lse_of(query, key, d**-0.5)
    assert rel_err(native.colmass(strided, key, lse, d**-0.5, True), reference_mass(query, key, value, d**-0.5)) < 1e-5
    # padded queries (query_valid) give no mass, through the backend's long-call path (small blocks force it)
    valid = torch.ones(b, q, dtype=torch.bool)
    valid[1, :9] = False
    _, mass = cpu.attention_with_stats(query, key, value, scaling=d**-0.5, query_valid=valid, need_mass=True, **LONG)
    assert rel_err(mass, reference_mass(query, key, value, d**-0.5, query_valid=valid)) < 1e-5
    # bfloat16 inputs: computed in float32 from the rounded values
    qb, kb, vb = query.bfloat16(), key.bfloat16(), value.bfloat16()
    _, mass = cpu.attention_with_stats(qb, kb, vb, scaling=d**-0.5, need_mass=True, **LONG)
    assert rel_err(mass, reference_mass(qb, kb, vb, d**-0.5)) < 1e-2


def test_colmass_non_causal_with_more_queries_than_keys_and_empty_batches():
    query, key, value, _, _ = make_inputs(1, 4, 2, 1000, 500, 32, torch.float32, False, seed=9)
    _, mass = cpu.attention_with_stats(query, key, value, scaling=0.2, causal=False, need_mass=True)
    assert rel_err(mass, reference_mass(query, key, value, 0.2, causal=False)) < 1e-5
    empty = native.colmass(torch.randn(0, 4, 600, 16), torch.randn(0, 2, 600, 16), torch.zeros(0, 4, 600), 0.25, True)
    assert empty.shape == (0, 2, 600)


def test_colmass_is_deterministic_across_thread_counts():
    query, key, value, _, _ = make_inputs(1, 8, 2, 600, 900, 32, torch.float32, False, seed=3)
    lse = lse_of(query, key, 32**-0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.colmass(query, key, lse, 32**-0.5, True)
        torch.set_num_threads(2)
        two = native.colmass(query, key, lse, 32**-0.5, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each key's sum is made by one task in a fixed order


def test_cpu_backend_uses_the_compiled_kernel_and_the_fallback_agrees(monkeypatch):
    query, key, value, _, _ = make_inputs(1, 8, 2, 700, 700, 32, torch.float32, False, seed=5)
    calls = []
    real = native.colmass
    monkeypatch.setattr(native, "colmass", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, fused = cpu.attention_with_stats(query, key, value, scaling=32**-0.5, need_mass=True)
    assert calls, "the no-padding long-call path must use the compiled kernel"
    monkeypatch.setenv("TOKENMEM_NATIVE", "0")
    _, fallback = cpu.attention_with_stats(query, key, value, scaling=32**-0.5, need_mass=True)
    assert len(calls) == 1
    ref = reference_mass(query, key, value, 32**-0.5)
    assert rel_err(fused, ref) < 1e-5 and rel_err(fallback, ref) < 1e-5


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("TOKENMEM_CACHE", str(tmp_path))
    return tmp_path


def test_build_at_first_use_into_the_cache(fresh_native):
    fn = native.load()
    assert fn is not None
    built = list((fresh_native / "kernels").glob("colmass-*.so"))
    assert len(built) == 1
    assert native.build() == built[0]  # cached: the same file, not rebuilt
    assert built[0].stat().st_mode & 0o755 == 0o755  # loadable by others sharing the cache


def test_broken_compiler_warns_and_falls_back_or_fails_when_required(fresh_native, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # found on PATH, fails every call
    monkeypatch.setenv("TOKENMEM_NATIVE", "1")  # the default (the test command exports require)
    transposed = cpu._mass_transposed
    with pytest.warns(RuntimeWarning, match="fused CPU attention-mass kernel is unavailable"):
        assert native.load() is None
    query, key, value, _, _ = make_inputs(1, 4, 2, 300, 300, 16, torch.float32, False, seed=1)
    calls = []
    monkeypatch.setattr(cpu, "_mass_transposed", lambda *a: calls.append(1) or transposed(*a))
    _, mass = cpu.attention_with_stats(query, key, value, scaling=0.25, need_mass=True, **LONG)  # the PyTorch path
    assert calls
    assert rel_err(mass, reference_mass(query, key, value, 0.25)) < 1e-5
    monkeypatch.setenv("TOKENMEM_NATIVE", "require")
    with pytest.raises(tokenmem.TokenmemError, match="TOKENMEM_NATIVE=require.*building the fused CPU kernel failed"):
        native.load()
    monkeypatch.setenv("TOKENMEM_NATIVE", "sometimes")
    with pytest.raises(tokenmem.TokenmemError, match="TOKENMEM_NATIVE='sometimes'"):
        native.load()


def test_colmass_rejects_mismatched_shapes():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 9, 8)
    with pytest.raises(tokenmem.TokenmemError, match="lse"):
        native.colmass(q, k, torch.zeros(1, 4, 6), 1.0, True)
    with pytest.raises(tokenmem.TokenmemError, match="multiple of hkv"):
        native.colmass(torch.randn(1, 3, 5, 8), k, torch.zeros(1, 3, 5), 1.0, True)
    with pytest.raises(tokenmem.TokenmemError, match="out must be"):
        native.colmass(q, k, torch.zeros(1, 4, 5), 1.0, True, out=torch.zeros(1, 2, 8))


# -- the thread pool and the cache ------------------------------------------------------------------------------
def private_kernel(tmp_path):
    """A copy of the built library loaded under its own path: its own pool, untouched by other tests' calls."""
    copy = tmp_path / "private" / "colmass-private.so"
    copy.parent.mkdir()
    shutil.copy(native.build(), copy)
    return native._bind(copy)


def pool_problems(count):
    """`count` different causal problems (query, key, value, lse), each of several tasks (key panels x KV heads)."""
    problems = []
    for i in range(count):
        q, n = 150 + 37 * i, 300 + 53 * i
        query, key, value, _, _ = make_inputs(1, 4, 2, q, n, 24, torch.float32, False, seed=40 + i)
        problems.append((query, key, value, lse_of(query, key, 24**-0.5)))
    return problems


def test_concurrent_calls_from_python_threads_equal_sequential_calls_and_the_reference():
    problems = pool_problems(4)
    sequential = [native.colmass(q, k, lse, 24**-0.5, True, threads=1) for q, k, _, lse in problems]
    for (q, k, v, _), mass in zip(problems, sequential):
        assert rel_err(mass, reference_mass(q, k, v, 24**-0.5)) < 1e-5
    start = threading.Barrier(8)
    results, errors = {}, []

    def caller(index):  # 8 threads, two per problem, each asking for 4 threads: most calls find the pool busy
        try:
            start.wait()
            q, k, _, lse = problems[index % 4]
            results[index] = [native.colmass(q, k, lse, 24**-0.5, True, threads=4) for _ in range(5)]
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a concurrent call did not return (deadlock?)"
    assert not errors, errors
    for index, masses in results.items():
        assert all(torch.equal(m, sequential[index % 4]) for m in masses)  # bit-identical: one task per key panel
    assert len(results) == 8


def test_the_pool_starts_its_threads_once_and_never_more_than_its_size(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMEM_NATIVE_THREADS", "3")  # read when the private copy makes its pool
    fn = private_kernel(tmp_path)
    assert native.pool_stats(fn) == {"size": None, "started": 0}  # lazy: nothing before the first call
    (q, k, v, lse), = pool_problems(1)
    want = native.colmass(q, k, lse, 24**-0.5, True, fn=fn, threads=1)
    assert native.pool_stats(fn) == {"size": None, "started": 0}  # a one-thread call needs no pool
    assert torch.equal(native.colmass(q, k, lse, 24**-0.5, True, fn=fn, threads=2), want)
    assert native.pool_stats(fn) == {"size": 3, "started": 1}  # one helper for a two-thread call
    for threads in (8, 3, 2, 16):  # asking for more than the pool's size is capped by it
        assert torch.equal(native.colmass(q, k, lse, 24**-0.5, True, fn=fn, threads=threads), want)
    assert native.pool_stats(fn) == {"size": 3, "started": 2}

    def caller():
        for _ in range(10):
            assert torch.equal(native.colmass(q, k, lse, 24**-0.5, True, fn=fn, threads=8), want)

    callers = [threading.Thread(target=caller) for _ in range(6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in callers)
    assert native.pool_stats(fn) == {"size": 3, "started": 2}  # 60 more calls, 6 at once: no new thread


def test_native_threads_must_be_a_positive_integer(monkeypatch):
    (q, k, _, lse), = pool_problems(1)
    monkeypatch.setenv("TOKENMEM_NATIVE_THREADS", "many")
    with pytest.raises(tokenmem.TokenmemError, match="TOKENMEM_NATIVE_THREADS='many'"):
        native.colmass(q, k, lse, 24**-0.5, True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_makes_its_own_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMEM_NATIVE_THREADS", "2")  # a pool of one worker, also on a one-CPU machine
    fn = private_kernel(tmp_path)
    (q, k, _, lse), = pool_problems(1)
    want = native.colmass(q, k, lse, 24**-0.5, True, fn=fn, threads=2)
    assert native.pool_stats(fn)["started"] == 1
    q, k, lse = q.contiguous(), k.contiguous(), lse.float().contiguous()
    out = torch.empty_like(want)
    pid = os.fork()
    if pid == 0:  # the child: no torch op here (OpenMP is not fork-safe), only the kernel and numpy
        code = 1
        try:
            b, hq, nq, d = q.shape
            hkv, n = k.shape[1], k.shape[2]
            status = fn(q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3], lse.data_ptr(), *lse.stride(),
                        out.data_ptr(), b, hkv, hq // hkv, nq, n, d, 24**-0.5, 1, 2)
            lib = native._libs[id(fn)]
            # the parent's helper does not exist here: a new pool started its own (the old one would hang)
            if status == 0 and lib.tokenmem_pool_started() == 1 and out.numpy().tobytes() == want.numpy().tobytes():
                code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the kernel (did it wait for the parent's threads?)")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert torch.equal(native.colmass(q, k, lse, 24**-0.5, True, fn=fn, threads=2), want)  # the parent's pool works


def test_the_interpreter_exits_cleanly_while_the_pool_is_busy():
    # daemon threads still inside the kernel (and its workers busy) when the interpreter exits; they call the ctypes
    # function directly because a daemon thread inside a torch op at exit aborts the process by itself (torch 2.13)
    script = textwrap.dedent("""
        import threading, torch
        from tokenmem.kernels import native
        q, k = torch.randn(1, 8, 2000, 64), torch.randn(1, 2, 2000, 64)
        lse = torch.logsumexp(q @ k.repeat_interleave(4, 1).transpose(-1, -2) / 8, -1)
        fn, outs = native.load(), [torch.empty(1, 2, 2000) for _ in range(3)]
        args = (q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3], lse.data_ptr(), *lse.stride())
        def spin(out):
            while True:
                fn(*args, out.data_ptr(), 1, 2, 4, 2000, 2000, 64, 0.125, 0, 2)
        for out in outs:
            threading.Thread(target=spin, args=(out,), daemon=True).start()
        native.colmass(q, k, lse, 0.125, False, threads=2)
        assert native.pool_stats()["started"] >= 1
        print("exiting", flush=True)
    """)
    env = {**os.environ, "TOKENMEM_NATIVE_THREADS": "2"}  # workers exist even on a one-CPU machine
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0 and proc.stdout.strip() == "exiting", proc.stderr[-2000:]


def test_stale_builds_are_removed_and_the_current_one_kept(fresh_native):
    folder = fresh_native / "kernels"
    folder.mkdir()
    kind = native._cpu_kind()
    stale = [folder / f"colmass-{kind}-0000000000000000.so", folder / "colmass-0123456789abcdef.so"]  # this CPU
    kept = [folder / "colmass-ffffffff-0000000000000000.so", folder / "notes.txt"]  # another CPU kind; not a build
    fresh = folder / f"colmass-{kind}-2222222222222222.so"  # just written (by a process of another version?)
    hour_ago = time.time() - 3600
    for path in stale + kept + [fresh]:
        path.write_bytes(b"old")
        if path != fresh:
            os.utime(path, (hour_ago, hour_ago))
    (folder / f"colmass-{kind}-1111111111111111.so").mkdir()  # cannot be unlinked: skipped, no error
    os.utime(folder / f"colmass-{kind}-1111111111111111.so", (hour_ago, hour_ago))
    current = native.build()  # builds, then cleans
    assert current.is_file() and current.name.startswith(f"colmass-{kind}-")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept) and fresh.exists()
    os.utime(fresh, (hour_ago, hour_ago))  # ten minutes later
    assert native.build() == current  # found in the cache, cleans too
    assert not fresh.exists() and current.is_file()
    assert native.load() is not None
