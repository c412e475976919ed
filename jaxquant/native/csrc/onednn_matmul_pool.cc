// jaxquant's batched int8 matmul and int8 max-pool on oneDNN, called from XLA as FFI custom calls.
//
// * JqMatmulU8S8: acc (M, N) int32 = x (M, K) uint8 @ w (K, N) int8, for the dense layers with more
//   rows than the VNNI GEMV takes (jaxquant/native/__init__.py GEMV_MAX_M). It reads the weight the
//   GEMV already packed at convert time, [ceil(N/64)][ceil(K/4)][64][4] int8: that is oneDNN's
//   blocked weight layout BA16a64b4a (per 64 output columns, per 64 inputs, 16 x (64 x 4)) when K is
//   a multiple of 64, so no second packed copy is stored. Only the raw dot runs here; the zero-point terms and the float
//   epilogue stay in XLA, so results equal the pure-XLA kernel exactly (int32 sums are exact).
// * JqMaxPoolU8: 2-D max pooling of uint8 or int8 NHWC data, an AVX-512 loop (64 channels per
//   vector max; oneDNN 3.2's int8 pooling and XLA's reduce_window both took ~0.4 ms for the Fashion
//   CNN's first pool at batch 64, this loop a fraction of it, see docs/cpu_performance.md). Padded taps
//   are skipped, as XLA's reduce_window with the dtype's minimum as init value ignores them, so the
//   result equals the pure-XLA pool bit for bit.
// The matmul primitives are cached per shape behind a mutex, as the convolutions' are (jaxquant_native.cc).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"
#include "onednn_common.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;
using jaxquant_native::cpu_engine;
using jaxquant_native::OmpThreads;

namespace {

// Matmuls below this many multiply-accumulates run on the calling thread. Measured under load (2 cores,
// load average 12): the Fashion CNN's fc1 (64 x 3136 x 128, 26 M) took 0.048 ms on one thread and
// 0.086 ms on two; a fork/join whose second thread waits for a busy core costs more than it saves.
constexpr int64_t kSingleThreadWork = int64_t{1} << 26;


constexpr int64_t kCols = 64;  // output columns per packed group (the GEMV's kCols)

std::string key_of(const int64_t* v, size_t n) { return std::string(reinterpret_cast<const char*>(v), n * 8); }

std::mutex g_mutex;

template <class P>
std::shared_ptr<P> cached(std::unordered_map<std::string, std::shared_ptr<P>>& cache, const std::string& key,
                          const std::function<std::shared_ptr<P>()>& make) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto p = make();
  std::lock_guard<std::mutex> lock(g_mutex);
  return cache.emplace(key, p).first->second;
}

// ----------------------------------------------------------------------------- matmul

struct MatmulEntry {
  dnnl::matmul prim;
  memory::desc src, wei, dst;
  size_t scratch = 0;
};

std::unordered_map<std::string, std::shared_ptr<MatmulEntry>> g_matmul;

std::shared_ptr<MatmulEntry> get_matmul(int64_t m, int64_t k, int64_t n) {
  const int64_t dims[3] = {m, k, n};
  return cached<MatmulEntry>(g_matmul, key_of(dims, 3), [&] {
    auto e = std::make_shared<MatmulEntry>();
    e->src = memory::desc({m, k}, dt::u8, tag::ab);
    e->wei = memory::desc({k, n}, dt::s8, tag::BA16a64b4a);
    e->dst = memory::desc({m, n}, dt::s32, tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::matmul::primitive_desc pd(cpu_engine(), e->src, e->wei, e->dst, attr);
    e->scratch = pd.scratchpad_desc().get_size();
    e->prim = dnnl::matmul(pd);
    return e;
  });
}

ffi::Error MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer wp, ffi::Result<ffi::AnyBuffer> acc) {
  auto xd = x.dimensions();
  auto od = acc->dimensions();
  if (xd.size() != 2 || od.size() != 2 || xd[0] != od[0] || x.element_type() != ffi::DataType::U8 ||
      acc->element_type() != ffi::DataType::S32 || xd[0] < 1 || xd[1] < 1 || od[1] < 1)
    return ffi::Error::InvalidArgument("JqMatmulU8S8: expects uint8 x (M, K) and int32 out (M, N)");
  const int64_t m = xd[0], k = xd[1], n = od[1];
  const int64_t groups = (n + kCols - 1) / kCols, kb4 = (k + 3) / 4, kb64 = (k + 63) / 64;
  if (static_cast<int64_t>(wp.size_bytes()) != groups * kb4 * kCols * 4)
    return ffi::Error::InvalidArgument("JqMatmulU8S8: packed weight size does not match (M, K) x (K, N)");
  try {
    OmpThreads threads(m * k * n < kSingleThreadWork);
    auto e = get_matmul(m, k, n);
    void* w = wp.untyped_data();
    thread_local std::vector<int8_t> wpad;
    if (kb4 * 4 != kb64 * 64) {
      // The GEMV pads K to a multiple of 4, oneDNN's block to 64 (16a...4a): per group, the same rows then
      // zeros. A per-call copy of the weight: only for K % 64 != 0, which no layer of the example models has.
      const size_t have = kb4 * kCols * 4, want = kb64 * kCols * 64;
      wpad.assign(groups * want, 0);
      for (int64_t g = 0; g < groups; ++g)
        std::memcpy(wpad.data() + g * want, static_cast<const int8_t*>(w) + g * have, have);
      w = wpad.data();
    }
    thread_local dnnl::stream stream(cpu_engine());
    thread_local std::vector<uint8_t> scratch;
    if (scratch.size() < e->scratch) scratch.resize(e->scratch);
    memory src(e->src, cpu_engine(), x.untyped_data()), wei(e->wei, cpu_engine(), w),
        dst(e->dst, cpu_engine(), acc->untyped_data()), pad(memory::desc({static_cast<int64_t>(e->scratch)}, dt::u8,
                                                                     tag::a), cpu_engine(), scratch.data());
    e->prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                             {DNNL_ARG_SCRATCHPAD, pad}});
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("JqMatmulU8S8: oneDNN: ") + err.what());
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------- max pool

// cfg: kh, kw, sh, sw, pt, pb, pl, pr (jaxquant/native/ops.py native_max_pool).
constexpr size_t kPoolCfgLen = 8;

struct PoolGeom {
  int64_t n, h, w, c, oh, ow, kh, kw, sh, sw, pt, pl;
};

// One output row (image b, output row oy): per output pixel, the elementwise max over the window's
// in-range taps, 64 channels at a time. Taps outside the image are skipped, as XLA's reduce_window
// pads with the dtype's minimum, which never wins a max.
// C a multiple of 32 (the CNNs' channel counts): full 32-byte vectors, no masks, no tail.
template <bool kSigned>
__attribute__((target("avx2"))) void pool_row_avx2_c32(const uint8_t* x, uint8_t* y, const PoolGeom& g, int64_t b,
                                                       int64_t oy) {
  const int64_t y0 = std::max<int64_t>(0, oy * g.sh - g.pt), y1 = std::min<int64_t>(g.h, oy * g.sh - g.pt + g.kh);
  for (int64_t ox = 0; ox < g.ow; ++ox) {
    const int64_t x0 = std::max<int64_t>(0, ox * g.sw - g.pl), x1 = std::min<int64_t>(g.w, ox * g.sw - g.pl + g.kw);
    uint8_t* out = y + ((b * g.oh + oy) * g.ow + ox) * g.c;
    for (int64_t c0 = 0; c0 < g.c; c0 += 32) {
      const uint8_t* first = x + ((b * g.h + y0) * g.w + x0) * g.c + c0;
      __m256i acc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first));
      for (int64_t iy = y0; iy < y1; ++iy)
        for (int64_t ix = (iy == y0 ? x0 + 1 : x0); ix < x1; ++ix) {
          const __m256i v =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + ((b * g.h + iy) * g.w + ix) * g.c + c0));
          acc = kSigned ? _mm256_max_epi8(acc, v) : _mm256_max_epu8(acc, v);
        }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c0), acc);
    }
  }
}

template <bool kSigned>
__attribute__((target("avx512f,avx512bw"))) void pool_row_avx512(const uint8_t* x, uint8_t* y, const PoolGeom& g,
                                                                 int64_t b, int64_t oy) {
  const __m512i lowest = _mm512_set1_epi8(kSigned ? static_cast<char>(0x80) : 0);
  for (int64_t ox = 0; ox < g.ow; ++ox) {
    uint8_t* out = y + ((b * g.oh + oy) * g.ow + ox) * g.c;
    for (int64_t c0 = 0; c0 < g.c; c0 += 64) {
      const int64_t len = std::min<int64_t>(64, g.c - c0);
      const __mmask64 mask = len == 64 ? ~__mmask64{0} : ((__mmask64{1} << len) - 1);
      __m512i acc = lowest;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.sh - g.pt + ky;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pl + kx;
          if (ix < 0 || ix >= g.w) continue;
          const __m512i v = _mm512_maskz_loadu_epi8(mask, x + ((b * g.h + iy) * g.w + ix) * g.c + c0);
          acc = kSigned ? _mm512_max_epi8(acc, v) : _mm512_max_epu8(acc, v);
        }
      }
      _mm512_mask_storeu_epi8(out + c0, mask, acc);
    }
  }
}

template <typename T>
void pool_row_scalar(const uint8_t* xb, uint8_t* yb, const PoolGeom& g, int64_t b, int64_t oy) {
  const T* x = reinterpret_cast<const T*>(xb);
  T* y = reinterpret_cast<T*>(yb);
  for (int64_t ox = 0; ox < g.ow; ++ox)
    for (int64_t ch = 0; ch < g.c; ++ch) {
      T acc = std::numeric_limits<T>::lowest();
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.sh - g.pt + ky;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pl + kx;
          if (ix >= 0 && ix < g.w) acc = std::max(acc, x[((b * g.h + iy) * g.w + ix) * g.c + ch]);
        }
      }
      y[((b * g.oh + oy) * g.ow + ox) * g.c + ch] = acc;
    }
}

// Below this many input bytes the pool runs on the calling thread (a fork/join costs more).
constexpr int64_t kPoolSingleThreadBytes = int64_t{1} << 22;

ffi::Error MaxPoolImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> cfg) {
  if (cfg.size() != kPoolCfgLen) return ffi::Error::InvalidArgument("JqMaxPoolU8: cfg has the wrong length");
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  const ffi::DataType t = x.element_type();
  if (xd.size() != 4 || yd.size() != 4 || (t != ffi::DataType::U8 && t != ffi::DataType::S8) ||
      y->element_type() != t)
    return ffi::Error::InvalidArgument("JqMaxPoolU8: expects uint8 or int8 (N, H, W, C) in and out");
  const int64_t* c = cfg.begin();
  for (size_t i = 0; i < kPoolCfgLen; ++i)
    if (c[i] < 0 || c[i] > (int64_t{1} << 24)) return ffi::Error::InvalidArgument("JqMaxPoolU8: cfg out of range");
  if (c[0] < 1 || c[1] < 1 || c[2] < 1 || c[3] < 1 || c[4] >= c[0] || c[5] >= c[0] || c[6] >= c[1] || c[7] >= c[1])
    return ffi::Error::InvalidArgument("JqMaxPoolU8: window, stride or padding out of range");
  if (xd[1] + c[4] + c[5] < c[0] || xd[2] + c[6] + c[7] < c[1])
    return ffi::Error::InvalidArgument("JqMaxPoolU8: the padded input is smaller than the window");
  const PoolGeom g{xd[0], xd[1], xd[2], xd[3], (xd[1] + c[4] + c[5] - c[0]) / c[2] + 1,
                   (xd[2] + c[6] + c[7] - c[1]) / c[3] + 1, c[0], c[1], c[2], c[3], c[4], c[6]};
  if (yd[0] != g.n || yd[1] != g.oh || yd[2] != g.ow || yd[3] != g.c)
    return ffi::Error::InvalidArgument("JqMaxPoolU8: output shape does not match the pooling");
  const uint8_t* xp = static_cast<const uint8_t*>(x.untyped_data());
  uint8_t* yp = static_cast<uint8_t*>(y->untyped_data());
  const bool is_signed = t == ffi::DataType::S8;
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const int64_t rows = g.n * g.oh;
  const int threads = static_cast<int64_t>(x.size_bytes()) >= kPoolSingleThreadBytes ? omp_get_max_threads() : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / g.oh, oy = r % g.oh;
    if (avx512 && g.c % 32 == 0) {  // every window has an in-image tap: padding < window
      if (is_signed) pool_row_avx2_c32<true>(xp, yp, g, b, oy);
      else pool_row_avx2_c32<false>(xp, yp, g, b, oy);
    } else if (avx512) {
      if (is_signed) pool_row_avx512<true>(xp, yp, g, b, oy);
      else pool_row_avx512<false>(xp, yp, g, b, oy);
    } else {
      if (is_signed) pool_row_scalar<int8_t>(xp, yp, g, b, oy);
      else pool_row_scalar<uint8_t>(xp, yp, g, b, oy);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqMatmulU8S8, MatmulImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqMaxPoolU8, MaxPoolImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Attr<ffi::Span<const int64_t>>(
                                  "cfg"));

extern "C" {

// Name of oneDNN's implementation for the (m, k) x (k, n) matmul on the packed weight (diagnostics),
// or the error; 0 on success.
int jq_matmul_impl_name(int64_t m, int64_t k, int64_t n, char* out, int64_t out_len) {
  try {
    OmpThreads threads(m * k * n < kSingleThreadWork);
    memory::desc src({m, k}, dt::u8, tag::ab), wei({k, n}, dt::s8, tag::BA16a64b4a), dst({m, n}, dt::s32, tag::ab);
    dnnl::matmul::primitive_desc pd(cpu_engine(), src, wei, dst);
    std::snprintf(out, out_len, "%s", pd.impl_info_str());
    return 0;
  } catch (const dnnl::error& err) {
    std::snprintf(out, out_len, "%s", err.what());
    return -1;
  }
}

}  // extern "C"
