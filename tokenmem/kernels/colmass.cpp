// Fused per-key attention mass for CPU tensors: mass[b, h, j] = mean_g sum_i exp(s[g, i, j] - lse[g, i]).
//
// Pass 2 of tokenmem's two-pass attention statistics (pass 1, PyTorch's fused flash kernel, gives the output and
// the row log-sum-exp). One fused loop per tile: the scores of R query rows x SUB keys are accumulated in vector
// registers (q . k over the head dim), then exp(s - lse) is summed over the rows into the keys' column sums. No
// score buffer is ever written to memory: the largest buffer is one packed key panel (PANEL keys x head dim).
//
// Work split: one task per (batch, KV head, panel of PANEL keys), so every task owns its output columns (no
// reduction between threads) and its result does not depend on which thread ran it; causal tasks skip the query
// rows that cannot see their keys. Tasks are taken in order of decreasing work (first panels first) from an atomic
// counter by the calling thread and up to `threads - 1` helpers borrowed from one persistent pool (see "The thread
// pool" below): threads are created once per process, never per call, and concurrent calls share them.
//
// Built at first use by tokenmem/kernels/native.py with the machine's C++ compiler (-O3 -march=native) and loaded
// with ctypes; the plain-torch twin is tokenmem/kernels/reference.py. The tiled structure follows FlashAttention
// (Dao et al. 2022, arXiv:2205.14135); exp is the Cephes single-precision polynomial (S. Moshier) on a
// round-to-nearest range reduction.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;  // floats per vector
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
#ifndef TM_NV
#define TM_NV 2
#endif
#ifndef TM_R
#if defined(__AVX512F__)
#define TM_R 12  // 24 accumulators of 32 zmm registers
#else
#define TM_R 6   // 12 accumulators of 16 ymm registers
#endif
#endif
constexpr int NV = TM_NV;       // vectors per tile row
constexpr int SUB = NV * W;     // keys per tile
constexpr int PANEL = 4 * SUB;  // keys per task
constexpr int R = TM_R;         // query rows per tile (at most 12)
constexpr int FLUSH = 32;       // tiles summed in float before a flush to double (bounds rounding growth)

inline vf splat(float x) { return vf{} + x; }
// a broadcast straight from memory (a load-port op; a register broadcast would take the shuffle port that the
// second 512-bit FMA unit shares)
inline vf bcast(const float* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(*p);
#else
  return splat(*p);
#endif
}
inline vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline vf vexp(vf x) {  // exp(x): 0 below -87 (and for -inf); x is clamped at 88 (callers pass x <= ~0)
  const vf lo = splat(-87.0f), hi = splat(88.0f);
  const vi under = x < lo;
  x = under ? lo : x;
  x = x > hi ? hi : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  const vi ni = (vi)t - (vi)splat(magic);
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const vf res = (vf)((vi)y + (ni << 23));
  return under ? splat(0.0f) : res;
}

// R' rows x SUB keys: s = q . kt (kt pre-scaled), col[j] += sum_r exp(s[r, j] - lse[r]) for j <= lim[r] (MASK).
template <int RR, bool MASK>
inline void tile(const float* q, int64_t ldq, const float* kt, int d, const float* lse, int64_t lds, float* col,
                 const int* lim) {
  vf acc[RR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = splat(0.0f);
  for (int c = 0; c < d; ++c) {
    vf k[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) k[v] = loadu(kt + c * SUB + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < RR; ++r) {
      const vf qb = bcast(q + r * ldq + c);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += qb * k[v];
    }
  }
  vi lane;
  for (int w = 0; w < W; ++w) lane[w] = w;
  vf sum[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) sum[v] = splat(0.0f);
#pragma GCC unroll 16
  for (int r = 0; r < RR; ++r) {
    const vf l = splat(lse[r * lds]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      vf x = acc[r][v] - l;
      if (MASK) x = (lane + v * W) <= lim[r] ? x : splat(-INFINITY);
      sum[v] += vexp(x);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) storeu(col + v * W, loadu(col + v * W) + sum[v]);
}

typedef void (*tile_fn)(const float*, int64_t, const float*, int, const float*, int64_t, float*, const int*);

template <int RR>
void tile_plain(const float* q, int64_t ldq, const float* kt, int d, const float* lse, int64_t lds, float* col,
                const int* lim) {
  tile<RR, false>(q, ldq, kt, d, lse, lds, col, lim);
}
template <int RR>
void tile_masked(const float* q, int64_t ldq, const float* kt, int d, const float* lse, int64_t lds, float* col,
                 const int* lim) {
  tile<RR, true>(q, ldq, kt, d, lse, lds, col, lim);
}

const tile_fn PLAIN[13] = {nullptr,        tile_plain<1>,  tile_plain<2>,  tile_plain<3>, tile_plain<4>,
                              tile_plain<5>,  tile_plain<6>,  tile_plain<7>,  tile_plain<8>, tile_plain<9>,
                              tile_plain<10>, tile_plain<11>, tile_plain<12>};
const tile_fn MASKED[13] = {nullptr,         tile_masked<1>,  tile_masked<2>,  tile_masked<3>, tile_masked<4>,
                               tile_masked<5>,  tile_masked<6>,  tile_masked<7>,  tile_masked<8>, tile_masked<9>,
                               tile_masked<10>, tile_masked<11>, tile_masked<12>};

struct Problem {
  const float* q;
  int64_t qsb, qsh, qsi;  // strides (elements) of query [b, hq, q, d]; the head dim is contiguous
  const float* k;
  int64_t ksb, ksh, ksj;  // strides of key [b, hkv, n, d]
  const float* lse;
  int64_t lsb, lsh, lsi;  // strides of lse [b, hq, q]
  float* mass;            // [b, hkv, n] contiguous
  int B, H, G, Q, N, D;
  float scale;
  bool causal;
};

void run_task(const Problem& p, int64_t task, std::vector<float>& kt, std::vector<double>& total) {
  const int panels = (p.N + PANEL - 1) / PANEL;
  const int panel = static_cast<int>(task / (static_cast<int64_t>(p.B) * p.H));  // panel-major: heavy ones first
  const int bh = static_cast<int>(task % (static_cast<int64_t>(p.B) * p.H));
  const int b = bh / p.H, h = bh % p.H;
  (void)panels;
  const int j0 = panel * PANEL, j1 = std::min(p.N, j0 + PANEL);
  const int subs = (j1 - j0 + SUB - 1) / SUB;
  // pack the panel: kt[s][c][w] = scale * key[j0 + s * SUB + w, c] (zero past the last key)
  std::fill(kt.begin(), kt.end(), 0.0f);
  const float* kbase = p.k + b * p.ksb + h * p.ksh;
  for (int j = j0; j < j1; ++j) {
    const int s = (j - j0) / SUB, w = (j - j0) % SUB;
    const float* row = kbase + j * p.ksj;
    float* dst = kt.data() + static_cast<int64_t>(s) * p.D * SUB + w;
    for (int c = 0; c < p.D; ++c) dst[c * SUB] = row[c] * p.scale;
  }
  std::fill(total.begin(), total.end(), 0.0);
  float col[PANEL];
  std::memset(col, 0, sizeof col);
  const int offset = p.N - p.Q;                                     // query i sees keys j <= i + offset (causal)
  const int first = p.causal ? std::max(0, j0 - offset) : 0;        // first query row that sees the panel
  int lim[R];
  int tiles = 0;
  for (int g = 0; g < p.G; ++g) {
    const int hq = h * p.G + g;
    const float* qbase = p.q + b * p.qsb + hq * p.qsh;
    const float* lbase = p.lse + b * p.lsb + hq * p.lsh;
    for (int i = first; i < p.Q; i += R) {
      const int rr = std::min(R, p.Q - i);
      for (int s = 0; s < subs; ++s) {
        const int s0 = j0 + s * SUB;
        const int valid = std::min(SUB, j1 - s0);  // keys of this tile
        const int see_first = p.causal ? i + offset - s0 : SUB - 1;   // last visible column of the tile's first row
        const int see_last = p.causal ? i + rr - 1 + offset - s0 : SUB - 1;
        if (see_last < 0) break;  // no row of the tile sees this or any later tile of the panel
        const float* kt_s = kt.data() + static_cast<int64_t>(s) * p.D * SUB;
        if (see_first >= SUB - 1 && valid == SUB) {
          PLAIN[rr](qbase + i * p.qsi, p.qsi, kt_s, p.D, lbase + i * p.lsi, p.lsi, col + s * SUB, nullptr);
        } else {
          for (int r = 0; r < rr; ++r) lim[r] = std::min(p.causal ? see_first + r : SUB - 1, valid - 1);
          MASKED[rr](qbase + i * p.qsi, p.qsi, kt_s, p.D, lbase + i * p.lsi, p.lsi, col + s * SUB, lim);
        }
      }
      if (++tiles == FLUSH) {
        for (int j = 0; j < PANEL; ++j) total[j] += col[j];
        std::memset(col, 0, sizeof col);
        tiles = 0;
      }
    }
  }
  float* out = p.mass + (static_cast<int64_t>(b) * p.H + h) * p.N;
  for (int j = j0; j < j1; ++j) out[j] = static_cast<float>((total[j - j0] + col[j - j0]) / p.G);
}

// ---------------------------------------------------------------------------------------------------------------
// The thread pool.
//
// One pool per process (per loaded copy of this library), created at the first call, holding at most
// `capacity` worker threads: TOKENMEM_NATIVE_THREADS - 1 when that variable is set (read once, when the pool is
// created), else hardware_concurrency() - 1; the calling thread is always the first of a call's threads. Workers
// are started lazily (only as many as calls have asked for so far) and then live until the process ends, parked on
// a condition variable while idle.
//
// A call takes min(threads, capacity + 1) threads: itself plus the idle workers it can borrow (it never waits for a
// busy one). Concurrent calls (several Python threads; ctypes releases the GIL) therefore share the workers: a call
// that finds them all busy runs every task on its own thread, and the total number of worker threads never exceeds
// `capacity`. A borrowed worker runs tasks of that one call until the call has none left, then parks again; the call
// returns once every worker it borrowed is back, so no worker ever touches a finished call. Workers never wait for
// anything but work and never call back into a pool, so there is no lock-order cycle and no deadlock.
//
// Process exit: the pool is never destroyed (a joinable std::thread destroyed at exit would call std::terminate, and
// joining parked workers would hang); exit() ends the parked workers with the process. The library is never unloaded
// while workers exist (ctypes does not dlclose).
//
// fork(): only the forking thread exists in the child, so a pool made before the fork has no workers there. The pool
// remembers the pid that made it; a call in another process abandons it (leaks it: its mutex and condition
// variables may hold the state of parent threads, so the child never touches them) and makes a fresh pool. The one
// lock a call takes before that check (the global `g_lock`) is held across fork() by a pthread_atfork handler, so
// the child never inherits it locked.
// ---------------------------------------------------------------------------------------------------------------

struct Job {  // one call: its problem, its task counter and the workers it borrowed
  const Problem* p;
  int64_t tasks;
  std::atomic<int64_t> next{0};  // next task to take
  std::atomic<int64_t> done{0};  // tasks finished (== tasks when the call succeeded)
  int helpers = 0;               // borrowed workers not yet back (guarded by Pool::m)
  std::condition_variable back;  // signalled when helpers drops to 0
};

// Take tasks of `job` until none is left. Scratch buffers are allocated per call and thread (a few KiB); a thread
// that cannot allocate takes no task (the others take them all).
void work(Job& job) {
  if (job.next.load() >= job.tasks) return;  // a late helper: nothing left to take
  std::vector<float> kt;
  std::vector<double> total;
  try {
    kt.resize(static_cast<size_t>(PANEL) * job.p->D);
    total.resize(PANEL);
  } catch (const std::bad_alloc&) {
    return;
  }
  for (int64_t t = job.next++; t < job.tasks; t = job.next++) {
    run_task(*job.p, t, kt, total);
    ++job.done;
  }
}

struct Worker {
  Job* job = nullptr;            // the call this worker is lent to (guarded by Pool::m)
  std::condition_variable wake;  // signalled when job is set
};

struct Pool {
  pid_t pid;
  int capacity;                   // most worker threads this pool will ever start
  std::mutex m;                   // guards everything below, every Worker::job and every Job::helpers
  std::vector<Worker*> idle;      // parked workers (capacity reserved up front: push_back never allocates)
  std::vector<std::thread> threads;
  int started = 0;                // workers started so far (never decreases: they are never stopped)

  explicit Pool(int cap) : pid(getpid()), capacity(cap) {
    idle.reserve(cap);
    threads.reserve(cap);
  }

  static void loop(Pool* pool, Worker* w) {
    std::unique_lock<std::mutex> lock(pool->m);
    for (;;) {
      w->wake.wait(lock, [w] { return w->job != nullptr; });
      Job* job = w->job;
      lock.unlock();
      work(*job);
      lock.lock();
      w->job = nullptr;
      pool->idle.push_back(w);
      if (--job->helpers == 0) job->back.notify_one();  // under the lock: the caller cannot return before we let go
    }
  }

  // Start one more worker (called with m held); false when out of threads or memory.
  bool start_worker() {
    Worker* w = new (std::nothrow) Worker;
    if (w == nullptr) return false;
    // workers block every signal, so that signals keep going to the Python threads that handle them
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    bool ok = true;
    try {
      threads.emplace_back(loop, this, w);
    } catch (...) {  // std::system_error: the system refused another thread
      ok = false;
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (!ok) {
      delete w;
      return false;
    }
    ++started;
    idle.push_back(w);
    return true;
  }

  // Lend up to `want` workers to `job` (starting new ones while under capacity); returns how many were lent.
  int lend(Job& job, int want) {
    std::lock_guard<std::mutex> lock(m);
    while (static_cast<int>(idle.size()) < want && started < capacity && start_worker()) {
    }
    const int n = std::min<int>(want, static_cast<int>(idle.size()));
    for (int i = 0; i < n; ++i) {
      Worker* w = idle.back();
      idle.pop_back();
      w->job = &job;
      w->wake.notify_one();
    }
    job.helpers = n;
    return n;
  }

  void wait_back(Job& job) {
    std::unique_lock<std::mutex> lock(m);
    job.back.wait(lock, [&job] { return job.helpers == 0; });
  }
};

std::mutex g_lock;        // guards g_pool
Pool* g_pool = nullptr;   // never deleted (see above)

int default_capacity() {
  const char* env = std::getenv("TOKENMEM_NATIVE_THREADS");
  long n = env != nullptr ? std::strtol(env, nullptr, 10) : 0;
  if (n < 1) n = static_cast<long>(std::thread::hardware_concurrency());
  return static_cast<int>(std::max(1L, std::min(n, 4096L))) - 1;
}

void atfork_prepare() { g_lock.lock(); }
void atfork_release() { g_lock.unlock(); }  // parent and child: the forking thread took it in prepare

// The current process's pool, or nullptr when it cannot be made (the call then runs on its own thread).
Pool* get_pool() {
  static const bool registered = pthread_atfork(atfork_prepare, atfork_release, atfork_release) == 0;
  (void)registered;
  std::lock_guard<std::mutex> lock(g_lock);
  if (g_pool != nullptr && g_pool->pid != getpid()) g_pool = nullptr;  // made before a fork: abandoned (leaked)
  if (g_pool == nullptr) g_pool = new (std::nothrow) Pool(default_capacity());
  return g_pool;
}

}  // namespace

extern "C" {

// Per-key mass (float32) of one attention call; see the file comment. `threads`: how many threads this call may
// use, the caller included (capped by the pool). Returns 0, -1 on bad sizes, -2 when the tasks could not all run
// (out of memory).
int tokenmem_colmass_f32(const float* q, int64_t qsb, int64_t qsh, int64_t qsi, const float* k, int64_t ksb,
                         int64_t ksh, int64_t ksj, const float* lse, int64_t lsb, int64_t lsh, int64_t lsi,
                         float* mass, int B, int H, int G, int Q, int N, int D, float scale, int causal,
                         int threads) {
  if (B <= 0 || H <= 0 || G <= 0 || Q <= 0 || N <= 0 || D <= 0 || (causal && N < Q)) return -1;
  try {  // no C++ exception may cross into Python (ctypes): report it as a status instead
    const Problem p{q, qsb, qsh, qsi, k, ksb, ksh, ksj, lse, lsb, lsh, lsi, mass, B, H, G, Q, N, D, scale,
                    causal != 0};
    Job job;
    job.p = &p;
    job.tasks = static_cast<int64_t>((N + PANEL - 1) / PANEL) * B * H;
    const int64_t want = std::min<int64_t>(std::max(threads, 1), job.tasks) - 1;  // helpers wanted
    Pool* pool = want > 0 ? get_pool() : nullptr;
    const int lent = pool != nullptr ? pool->lend(job, static_cast<int>(std::min<int64_t>(want, pool->capacity))) : 0;
    work(job);  // the caller works too, and alone when no worker was free
    if (lent > 0) pool->wait_back(job);
    return job.done.load() == job.tasks ? 0 : -2;
  } catch (...) {
    return -2;
  }
}

// The pool of this process: its capacity (most worker threads it may start; a call uses at most capacity + 1
// threads, its own included) or -1 before the first call that needed helpers, and how many workers it has started
// (threads ever created by this library in this process).
int tokenmem_pool_capacity() {
  std::lock_guard<std::mutex> lock(g_lock);
  return g_pool != nullptr && g_pool->pid == getpid() ? g_pool->capacity : -1;
}

int tokenmem_pool_started() {
  std::lock_guard<std::mutex> lock(g_lock);
  if (g_pool == nullptr || g_pool->pid != getpid()) return 0;
  std::lock_guard<std::mutex> pool_lock(g_pool->m);
  return g_pool->started;
}

int tokenmem_colmass_vector_width() { return W; }

}  // extern "C"
