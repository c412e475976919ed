// JqWeightOnlyGemv: the weight-only decode matmul, float32 x (M, K) times a block-quantized weight,
// called from XLA as an FFI custom call (jaxquant/native/weight_only_ops.py).
//
// The weight is read as jaxquant.weight_only.blockwise.BlockQuantizedWeight stores it, with no
// second packed copy and no float copy:
//   * 8 bits: uint8 codes (N, Kp), one row per output channel;
//   * 4 bits: uint8 (ceil(N/2), Kp), the low nibble of row r is output row r, the high nibble
//     output row r + ceil(N/2) (so one byte load feeds two output rows);
//   * scale float32 (N, G) and zero_point int32 (N, G), unsigned code domain, Kp = G * group_size,
//     w[k, n] = scale[n, g] * (code[n, k] - zero_point[n, g]) with g = k / group_size.
// Per 16 inputs: load 16 code bytes, zero-extend to int32 (vpmovzxbd), convert to f32 exactly
// (8 bits: vcvtdq2ps; 4 bits: a 16-entry table lookup per nibble, see step) and FMA with x. Each group's partial sum is scaled once (one FMA
// per group and row) and its zero point enters through the group's sum of x:
//   y[m, n] = sum_g scale[n, g] * (sum_{k in g} code[n, k] x[m, k] - zero_point[n, g] sum_{k in g} x[m, k])
// in float32, activations never quantized. Inputs past K (the zero-padded last group) are skipped.
// Rows are split between the calling thread and tasks on XLA's intra-op thread pool when the call's
// weights hold enough bytes.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define JQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr int kMaxMc = 4;        // activation rows per pass (more rows: another pass over L1-hot codes)
constexpr int64_t kRowBlock = 16;  // stored rows per parallel work item (16 x Kp bytes stay in L1/L2)
// Code bytes per participating thread: a call on fewer bytes runs on the calling thread alone.
int64_t g_parallel_bytes = int64_t{1} << 16;

struct Problem {
  const float* x;      // (M, K)
  const uint8_t* data; // (rows, Kp)
  const float* scale;  // (N, G)
  const int32_t* zp;   // (N, G)
  float* out;          // (M, N)
  const float* xsum;   // (M, G): sum of x over each group's inputs
  int64_t m, k, kp, n, g, gs, rows, half;  // half: row offset of the high nibble (4 bits)
};

// One 16-input step of R stored rows x MC activation rows: acc[r][u][m] += codes * x. The codes are
// converted as stored (unsigned): 8 bits by vpmovzxbd + vcvtdq2ps; 4 bits by one vpmovzxbd per 16
// bytes, then a 16-entry float table lookup (vpermps, which reads only the low 4 index bits, so the
// low nibble needs no mask and the high nibble one shift). The table holds 0.0f..15.0f, so the
// values are exactly those vcvtdq2ps gives: same numerics, one port-0 op fewer per 16 codes.
// MASKED: the ragged end of a group past K (masked-off lanes load code 0 and x 0: they add nothing).
template <int BITS, int R, int MC, bool MASKED>
JQ_AVX512 __attribute__((always_inline)) inline void step(const uint8_t* const* rowp, const float* const* xp,
                                                           int64_t k, __mmask16 mask, __m512 table,
                                                           __m512 (&acc)[R][BITS == 4 ? 2 : 1][MC]) {
  __m512 xv[MC];
  for (int m = 0; m < MC; ++m) xv[m] = MASKED ? _mm512_maskz_loadu_ps(mask, xp[m] + k) : _mm512_loadu_ps(xp[m] + k);
  for (int r = 0; r < R; ++r) {
    const __m512i v = _mm512_cvtepu8_epi32(MASKED ? _mm_maskz_loadu_epi8(mask, rowp[r] + k)
                                                  : _mm_loadu_si128(reinterpret_cast<const __m128i*>(rowp[r] + k)));
    if constexpr (BITS == 8) {
      const __m512 w = _mm512_cvtepi32_ps(v);
      for (int m = 0; m < MC; ++m) acc[r][0][m] = _mm512_fmadd_ps(w, xv[m], acc[r][0][m]);
    } else {
      const __m512 lo = _mm512_permutexvar_ps(v, table);
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
      for (int m = 0; m < MC; ++m) acc[r][0][m] = _mm512_fmadd_ps(lo, xv[m], acc[r][0][m]);
      for (int m = 0; m < MC; ++m) acc[r][1][m] = _mm512_fmadd_ps(hi, xv[m], acc[r][1][m]);
    }
  }
}

// sum_g scale[g] * zero_point[g] * xsum[g] over one output row's G groups, 16 groups per step: out
// of the code loop, where one scalar multiply-add per group and output cost as much as the codes
// of a 32-input group.
JQ_AVX512 inline float zero_point_term(const float* s, const int32_t* zp, const float* xsum, int64_t n_groups) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < n_groups; g += 16) {
    const __mmask16 mask = n_groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n_groups - g)) - 1);
    const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + g),
                                    _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, zp + g)));
    acc = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mask, xsum + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// R stored rows (8 bits: R outputs; 4 bits: 2R outputs) x MC activation rows, starting at stored
// row r0 and activation row m0. The zero point enters once per group and output as
// scale * zero_point * sum_{k in g} x (p.xsum, zero_point_term): one vector op fewer per 16 codes
// than subtracting it from every code. Each (row,
// activation row) pair has one accumulator chain in k order, so the result does not depend on R.
template <int BITS, int R, int MC>
JQ_AVX512 void block_kernel(const Problem& p, int64_t r0, int64_t m0) {
  constexpr int U = BITS == 4 ? 2 : 1;
  __m512 tot[R][U][MC];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MC; ++m) tot[r][u][m] = _mm512_setzero_ps();
  int64_t nrow[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) nrow[r][u] = r0 + r + u * p.half;  // output row; >= n is padding
  const uint8_t* rowp[R];
  for (int r = 0; r < R; ++r) rowp[r] = p.data + (r0 + r) * p.kp;
  const float* xp[MC];
  for (int m = 0; m < MC; ++m) xp[m] = p.x + (m0 + m) * p.k;
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // The same columns R rows further on (the next block of this work item): the rows of a block are
  // R interleaved streams, more than the hardware prefetcher follows well on one core.
  const int64_t ahead = R * p.kp;
  const int64_t k_end = p.k, gs = p.gs, n_groups = p.g;

  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t kb = g * gs, ke = std::min(kb + gs, k_end);
    if (kb >= ke) break;
    __m512 acc[R][U][MC];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u)
        for (int m = 0; m < MC; ++m) acc[r][u][m] = _mm512_setzero_ps();
    int64_t k = kb;
    for (; k + 64 <= ke; k += 64) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rowp[r] + k + ahead), _MM_HINT_T0);
      step<BITS, R, MC, false>(rowp, xp, k, 0xFFFF, table, acc);
      step<BITS, R, MC, false>(rowp, xp, k + 16, 0xFFFF, table, acc);
      step<BITS, R, MC, false>(rowp, xp, k + 32, 0xFFFF, table, acc);
      step<BITS, R, MC, false>(rowp, xp, k + 48, 0xFFFF, table, acc);
    }
    for (; k + 16 <= ke; k += 16) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rowp[r] + k + ahead), _MM_HINT_T0);
      step<BITS, R, MC, false>(rowp, xp, k, 0xFFFF, table, acc);
    }
    if (k < ke) step<BITS, R, MC, true>(rowp, xp, k, __mmask16((1u << (ke - k)) - 1), table, acc);
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) {
        if (nrow[r][u] >= p.n) continue;
        const __m512 sv = _mm512_set1_ps(p.scale[nrow[r][u] * n_groups + g]);
        for (int m = 0; m < MC; ++m) tot[r][u][m] = _mm512_fmadd_ps(acc[r][u][m], sv, tot[r][u][m]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) {
      if (nrow[r][u] >= p.n) continue;
      const float* s = p.scale + nrow[r][u] * n_groups;
      const int32_t* zp = p.zp + nrow[r][u] * n_groups;
      for (int m = 0; m < MC; ++m)
        p.out[(m0 + m) * p.n + nrow[r][u]] =
            _mm512_reduce_add_ps(tot[r][u][m]) - zero_point_term(s, zp, p.xsum + (m0 + m) * n_groups, n_groups);
    }
}

// Rows per kernel call: R * U * MC = 8 accumulator chains (FMA latency 4, two FMA ports), and few
// enough registers (acc + tot + x + temporaries) for the 32 zmm registers.
template <int BITS, int MC>
constexpr int rows_per_call() {
  constexpr int outs = MC == 1 ? 8 : (MC == 2 ? 4 : 2);  // outputs per call
  return BITS == 8 ? outs : outs / 2;
}

template <int BITS, int MC>
void rows_range(const Problem& p, int64_t a, int64_t b, int64_t m0) {
  constexpr int R = rows_per_call<BITS, MC>();
  int64_t r = a;
  for (; r + R <= b; r += R) block_kernel<BITS, R, MC>(p, r, m0);
  for (; r < b; ++r) block_kernel<BITS, 1, MC>(p, r, m0);
}

template <int BITS>
void row_block(const Problem& p, int64_t a, int64_t b) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kMaxMc) {
    switch (std::min<int64_t>(kMaxMc, p.m - m0)) {
      case 1: rows_range<BITS, 1>(p, a, b, m0); break;
      case 2: rows_range<BITS, 2>(p, a, b, m0); break;
      case 3: rows_range<BITS, 3>(p, a, b, m0); break;
      default: rows_range<BITS, 4>(p, a, b, m0); break;
    }
  }
}

// Checks one weight's buffers against x (M, K) and fills p; "" when they fit.
const char* bind_weight(Problem& p, const ffi::AnyBuffer& x, const ffi::AnyBuffer& data, const ffi::AnyBuffer& scale,
                        const ffi::AnyBuffer& zp, ffi::Result<ffi::AnyBuffer>& out, int64_t bits, int64_t group_size) {
  auto xd = x.dimensions(), dd = data.dimensions(), sd = scale.dimensions(), zd = zp.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || dd.size() != 2 || sd.size() != 2 || zd.size() != 2 || od.size() != 2 ||
      x.element_type() != ffi::DataType::F32 || data.element_type() != ffi::DataType::U8 ||
      scale.element_type() != ffi::DataType::F32 || zp.element_type() != ffi::DataType::S32 ||
      out->element_type() != ffi::DataType::F32)
    return "JqWeightOnlyGemv: expects float32 x (M, K) and per weight uint8 codes (rows, Kp), float32 scale "
           "(N, G), int32 zero_point (N, G) and a float32 (M, N) result";
  p.m = xd[0];
  p.k = xd[1];
  p.rows = dd[0];
  p.kp = dd[1];
  p.n = od[1];
  p.g = sd[1];
  p.gs = group_size;
  if (bits != 4 && bits != 8) return "JqWeightOnlyGemv: bits must be 4 or 8";
  if (od[0] != p.m || sd[0] != p.n || zd[0] != p.n || zd[1] != p.g || p.gs < 1 || p.g < 1 ||
      p.kp != p.g * p.gs || p.k > p.kp || p.k <= p.kp - p.gs || p.rows != (bits == 8 ? p.n : (p.n + 1) / 2))
    return "JqWeightOnlyGemv: shapes do not match one block-quantized weight (codes rows must be N for 8 bits, "
           "ceil(N/2) for 4 bits; Kp = G * group_size; the last group must hold inputs)";
  p.half = bits == 4 ? p.rows : 0;
  p.x = static_cast<const float*>(x.untyped_data());
  p.data = static_cast<const uint8_t*>(data.untyped_data());
  p.scale = static_cast<const float*>(scale.untyped_data());
  p.zp = static_cast<const int32_t*>(zp.untyped_data());
  p.out = static_cast<float*>(out->untyped_data());
  return "";
}

// One call's work, shared with the helper tasks: a helper that starts after every item is taken
// (XLA's pool thread was busy) finds nothing left and exits without touching the buffers, so the
// caller waits only for items that a helper actually took, never for a helper to wake up.
struct CallState {
  std::vector<Problem> ps;
  std::vector<std::pair<int32_t, int64_t>> items;  // (weight, first stored row) per work item
  std::vector<float> xsum;
  int bits = 8;
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      const Problem& p = ps[items[i].first];
      const int64_t a = items[i].second, e = std::min(a + kRowBlock, p.rows);
      bits == 8 ? row_block<8>(p, a, e) : row_block<4>(p, a, e);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// args: x, then (codes, scale, zero_point) per weight; one result per weight. Several weights that
// read the same x (Q/K/V, gate/up) share one call. Rows are split between the calling thread and
// tasks on XLA's own intra-op pool (ffi::ThreadPool): its threads are the ones XLA keeps warm during
// a decode step, where an OpenMP worker sleeping under OMP_WAIT_POLICY=PASSIVE costs a futex wake-up
// per call, and a late OpenMP worker holds the caller at the region's closing barrier.
ffi::Error WeightOnlyGemvImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t bits,
                              int64_t group_size) {
  const size_t nw = rets.size();
  if (nw == 0 || args.size() != 1 + 3 * nw)
    return ffi::Error::InvalidArgument("JqWeightOnlyGemv: expects x and 3 buffers (codes, scale, zero_point) per result");
  auto x = args.get<ffi::AnyBuffer>(0);
  if (!x.has_value()) return ffi::Error::InvalidArgument("JqWeightOnlyGemv: bad x");
  auto st = std::make_shared<CallState>();
  st->bits = static_cast<int>(bits);
  st->ps.resize(nw);
  int64_t bytes = 0;
  for (size_t i = 0; i < nw; ++i) {
    auto d = args.get<ffi::AnyBuffer>(1 + 3 * i), s = args.get<ffi::AnyBuffer>(2 + 3 * i),
         z = args.get<ffi::AnyBuffer>(3 + 3 * i);
    auto o = rets.get<ffi::AnyBuffer>(i);
    if (!d.has_value() || !s.has_value() || !z.has_value() || !o.has_value())
      return ffi::Error::InvalidArgument("JqWeightOnlyGemv: bad buffer");
    ffi::Result<ffi::AnyBuffer> out = *o;
    const char* err = bind_weight(st->ps[i], *x, *d, *s, *z, out, bits, group_size);
    if (*err) return ffi::Error::InvalidArgument(err);
    if (st->ps[i].m == 0 || st->ps[i].n == 0) continue;
    bytes += st->ps[i].rows * st->ps[i].kp;
    for (int64_t a = 0; a < st->ps[i].rows; a += kRowBlock) st->items.emplace_back(static_cast<int32_t>(i), a);
  }
  if (st->items.empty()) return ffi::Error::Success();
  // Group sums of x, shared by every weight (same K, same group size).
  const Problem& p0 = st->ps[st->items[0].first];
  st->xsum.assign(p0.m * p0.g, 0.0f);
  for (int64_t m = 0; m < p0.m; ++m)
    for (int64_t k = 0; k < p0.k; ++k) st->xsum[m * p0.g + k / p0.gs] += p0.x[m * p0.k + k];
  for (auto& p : st->ps) {
    if (p.k != p0.k || p.g != p0.g) return ffi::Error::InvalidArgument("JqWeightOnlyGemv: weights differ in K");
    p.xsum = st->xsum.data();
  }
  // Each participant gets at least g_parallel_bytes of codes: below that a helper's start-up costs
  // more than its share of the rows.
  const int64_t n_items = static_cast<int64_t>(st->items.size());
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n_items - 1);
  if (g_parallel_bytes > 0) helpers = std::min<int64_t>(helpers, bytes / g_parallel_bytes - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([st] { st->work(); });
  st->work();
  // A helper still on its last item: spin briefly, then yield, so that on a busy machine a helper
  // descheduled mid-item gets a core back instead of this thread burning it.
  for (int spins = 0; st->done.load(std::memory_order_acquire) < n_items; ++spins) {
    if (spins < 2000) _mm_pause();
    else std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqWeightOnlyGemv, WeightOnlyGemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size"));

extern "C" {

// 1 when this CPU runs the weight-only GEMV (AVX-512 F/BW/VL).
int jq_wo_gemv_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// A plain AVX-512 read of `bytes` bytes on `threads` OpenMP threads (a checksum, so the loads are
// not optimized away): the memory system's ceiling for the kernel (benchmarks/bench_weight_only_gemv.py).
JQ_AVX512 int64_t jq_wo_read_bytes(const uint8_t* data, int64_t bytes, int threads) {
  const int64_t n64 = bytes / 64;
  int64_t total = 0;
#pragma omp parallel for num_threads(std::max(threads, 1)) schedule(static) reduction(+ : total)
  for (int64_t t = 0; t < 64; ++t) {  // 64 contiguous slices, split over the threads
    const int64_t a = n64 * t / 64, b = n64 * (t + 1) / 64;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = a;
    for (; i + 4 <= b; i += 4) {
      s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(data + 64 * i));
      s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(data + 64 * i + 64));
      s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(data + 64 * i + 128));
      s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(data + 64 * i + 192));
    }
    for (; i < b; ++i) s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(data + 64 * i));
    total += _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
  }
  return total;
}

// The kernel alone on the calling thread, `reps` times (no XLA, no helper threads): the benchmark
// times it in thread CPU time, which a busy machine disturbs far less than wall time. Shapes as
// JqWeightOnlyGemv's (rows = N or ceil(N/2), Kp = G * group_size); returns 0, or -1 on bad sizes.
int jq_wo_gemv_run(const float* x, const uint8_t* data, const float* scale, const int32_t* zp, float* out, int64_t m,
                   int64_t k, int64_t n, int64_t n_groups, int64_t group_size, int64_t bits, int64_t reps) {
  if ((bits != 4 && bits != 8) || m < 1 || n < 1 || n_groups < 1 || group_size < 1 || k <= (n_groups - 1) * group_size ||
      k > n_groups * group_size || !jq_wo_gemv_supported())
    return -1;
  Problem p{};
  p.x = x, p.data = data, p.scale = scale, p.zp = zp, p.out = out;
  p.m = m, p.k = k, p.kp = n_groups * group_size, p.n = n, p.g = n_groups, p.gs = group_size;
  p.rows = bits == 8 ? n : (n + 1) / 2;
  p.half = bits == 4 ? p.rows : 0;
  std::vector<float> xsum(m * n_groups, 0.0f);
  for (int64_t r = 0; r < reps; ++r) {
    std::fill(xsum.begin(), xsum.end(), 0.0f);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < k; ++j) xsum[i * n_groups + j / group_size] += x[i * k + j];
    p.xsum = xsum.data();
    for (int64_t a = 0; a < p.rows; a += kRowBlock) {
      const int64_t e = std::min(a + kRowBlock, p.rows);
      bits == 8 ? row_block<8>(p, a, e) : row_block<4>(p, a, e);
    }
  }
  return 0;
}

// Code bytes from which a call splits its rows over the OpenMP threads (benchmarks tune it).
void jq_wo_gemv_set_parallel_bytes(int64_t bytes) { g_parallel_bytes = bytes; }
int64_t jq_wo_gemv_parallel_bytes() { return g_parallel_bytes; }

}  // extern "C"
