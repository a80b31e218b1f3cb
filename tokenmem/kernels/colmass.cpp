// Fused per-key attention mass for CPU tensors: mass[b, h, j] = mean_g sum_i exp(s[g, i, j] - lse[g, i]).
//
// Pass 2 of tokenmem's two-pass attention statistics (pass 1, PyTorch's fused flash kernel, gives the output and
// the row log-sum-exp). One fused loop per tile: the scores of R query rows x SUB keys are accumulated in vector
// registers (q . k over the head dim), then exp(s - lse) is summed over the rows into the keys' column sums. No
// score buffer is ever written to memory: the largest buffer is one packed key panel (PANEL keys x head dim).
//
// Work split: one task per (batch, KV head, panel of PANEL keys), so every task owns its output columns (no
// reduction between threads); causal tasks skip the query rows that cannot see their keys. Tasks are taken in
// order of decreasing work (first panels first) from an atomic counter by `threads` std::threads.
//
// Built at first use by tokenmem/kernels/native.py with the machine's C++ compiler (-O3 -march=native) and loaded
// with ctypes; the plain-torch twin is tokenmem/kernels/reference.py. The tiled structure follows FlashAttention
// (Dao et al. 2022, arXiv:2205.14135); exp is the Cephes single-precision polynomial (S. Moshier) on a
// round-to-nearest range reduction.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <system_error>
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

}  // namespace

extern "C" {

// Per-key mass (float32) of one attention call; see the file comment. Returns 0, -1 on bad sizes, -2 when a worker
// could not run (out of memory).
int tokenmem_colmass_f32(const float* q, int64_t qsb, int64_t qsh, int64_t qsi, const float* k, int64_t ksb,
                         int64_t ksh, int64_t ksj, const float* lse, int64_t lsb, int64_t lsh, int64_t lsi,
                         float* mass, int B, int H, int G, int Q, int N, int D, float scale, int causal,
                         int threads) {
  if (B <= 0 || H <= 0 || G <= 0 || Q <= 0 || N <= 0 || D <= 0 || (causal && N < Q)) return -1;
  const Problem p{q, qsb, qsh, qsi, k, ksb, ksh, ksj, lse, lsb, lsh, lsi, mass, B, H, G, Q, N, D, scale, causal != 0};
  const int64_t tasks = static_cast<int64_t>((N + PANEL - 1) / PANEL) * B * H;
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    std::vector<float> kt(static_cast<size_t>(PANEL) * D);
    std::vector<double> total(PANEL);
    for (int64_t t = next++; t < tasks; t = next++) run_task(p, t, kt, total);
  };
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  try {  // no C++ exception may cross into Python (ctypes): report it as a status instead
    std::vector<std::thread> pool;
    for (int t = 1; t < n; ++t) {
      try {
        pool.emplace_back(worker);
      } catch (const std::system_error&) {
        break;  // fewer threads than asked: the ones running take every task
      }
    }
    worker();
    for (auto& t : pool) t.join();
  } catch (...) {
    return -2;
  }
  return 0;
}

int tokenmem_colmass_vector_width() { return W; }

}  // extern "C"
