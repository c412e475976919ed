// The small non-matmul ops of a Llama decode step (one new token per sequence), each one FFI custom
// call instead of the 4-13 XLA kernels XLA CPU makes of them (jaxquant/native/decode_ops.py):
//
//   JqAddRmsNorm:      r = x (+ h); y = r * rsqrt(mean(r * r) + eps) * w         (rows of D floats)
//   JqDecodeAttention: rotate q and k (GGML adjacent pairs) at position `pos`, write k and v into the
//                      KV cache at slot `pos` (in place: the caches are aliased outputs), then
//                      softmax(q . K[s] / sqrt(D) over slots s <= pos) . V per head, grouped-query
//                      (query head h reads KV head h / (H / KVH)), without repeating K/V.
//
// Everything is float32 on the calling thread: at SmolLM2's sizes a call touches a few hundred KB at
// most, and waking another thread costs more than the work. The arithmetic follows the pure-JAX
// definitions in jaxquant/models/llama.py (same formulas, same masking constant's effect: a masked
// slot contributes exactly 0); the summation order differs, so results agree to float rounding.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error AddRmsNormImpl(ffi::RemainingArgs args, ffi::RemainingRets rets, float eps) {
  // args: x (M, D), w (D) [, h (M, D)]; rets: r (M, D), y (M, D).
  if (args.size() != 2 && args.size() != 3) return ffi::Error::InvalidArgument("JqAddRmsNorm: 2 or 3 operands");
  if (rets.size() != 2) return ffi::Error::InvalidArgument("JqAddRmsNorm: 2 results");
  auto x = args.get<ffi::AnyBuffer>(0);
  auto w = args.get<ffi::AnyBuffer>(1);
  auto r = rets.get<ffi::AnyBuffer>(0);
  auto y = rets.get<ffi::AnyBuffer>(1);
  if (!x.has_value() || !w.has_value() || !r.has_value() || !y.has_value())
    return ffi::Error::InvalidArgument("JqAddRmsNorm: bad buffer");
  const int64_t d = static_cast<int64_t>(w->element_count());
  const int64_t n = static_cast<int64_t>(x->element_count());
  if (d <= 0 || n % d != 0 || (*r)->element_count() != static_cast<size_t>(n) ||
      (*y)->element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("JqAddRmsNorm: x, r, y must hold rows of len(w) floats");
  const float* xp = static_cast<const float*>(x->untyped_data());
  const float* wp = static_cast<const float*>(w->untyped_data());
  const float* hp = nullptr;
  if (args.size() == 3) {
    auto h = args.get<ffi::AnyBuffer>(2);
    if (!h.has_value() || h->element_count() != static_cast<size_t>(n))
      return ffi::Error::InvalidArgument("JqAddRmsNorm: h must match x");
    hp = static_cast<const float*>(h->untyped_data());
  }
  float* rp = static_cast<float*>((*r)->untyped_data());
  float* yp = static_cast<float*>((*y)->untyped_data());
  for (int64_t m = 0; m < n / d; ++m) {
    const float* xr = xp + m * d;
    float* rr = rp + m * d;
    float ss = 0.0f;
    for (int64_t i = 0; i < d; ++i) {
      const float v = hp ? xr[i] + hp[m * d + i] : xr[i];
      rr[i] = v;
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    float* yr = yp + m * d;
    for (int64_t i = 0; i < d; ++i) yr[i] = rr[i] * inv * wp[i];
  }
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                               ffi::Buffer<ffi::F32> cache_k_in, ffi::Buffer<ffi::F32> cache_v_in,
                               ffi::Buffer<ffi::S32> pos_buf, ffi::ResultBuffer<ffi::F32> out,
                               ffi::ResultBuffer<ffi::F32> cache_k, ffi::ResultBuffer<ffi::F32> cache_v) {
  // q (B, H*D), k/v (B, KVH*D), cos/sin (D/2), caches (B, S, KVH, D) aliased to the cache results,
  // pos () int32; out (B, H*D).
  (void)cache_k_in;
  (void)cache_v_in;
  const auto cd = cache_k->dimensions();
  if (cd.size() != 4 || cache_v->dimensions().size() != 4) return ffi::Error::InvalidArgument("JqDecodeAttention: caches must be 4-D");
  const int64_t b = cd[0], s_len = cd[1], kvh = cd[2], d = cd[3];
  const int64_t half = static_cast<int64_t>(cos.element_count());
  if (d % 2 != 0 || half * 2 != d || static_cast<int64_t>(sin.element_count()) != half || kvh <= 0 || s_len <= 0)
    return ffi::Error::InvalidArgument("JqDecodeAttention: cos/sin must hold head_dim/2 angles");
  for (size_t i = 0; i < 4; ++i)
    if (cache_v->dimensions()[i] != cd[i]) return ffi::Error::InvalidArgument("JqDecodeAttention: k/v caches differ");
  if (static_cast<int64_t>(k.element_count()) != b * kvh * d || static_cast<int64_t>(v.element_count()) != b * kvh * d)
    return ffi::Error::InvalidArgument("JqDecodeAttention: k/v must be (B, KVH*D)");
  const int64_t qn = static_cast<int64_t>(q.element_count());
  if (qn % (b * d) != 0 || (qn / (b * d)) % kvh != 0 || static_cast<int64_t>(out->element_count()) != qn)
    return ffi::Error::InvalidArgument("JqDecodeAttention: q must be (B, H*D) with H a multiple of KVH");
  const int64_t h = qn / (b * d), g = h / kvh;
  const int32_t pos = pos_buf.typed_data()[0];
  // As lax.dynamic_update_slice: the write index is clamped into the cache, the mask is not.
  const int64_t slot = std::min<int64_t>(std::max<int64_t>(pos, 0), s_len - 1);
  const int64_t n_keys = std::min<int64_t>(static_cast<int64_t>(pos) + 1, s_len);
  const float* c = cos.typed_data();
  const float* sn = sin.typed_data();
  float* ck = cache_k->typed_data();
  float* cv = cache_v->typed_data();
  float* op = out->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> qr(d), scores(std::max<int64_t>(n_keys, 1));
  for (int64_t bi = 0; bi < b; ++bi) {
    float* kc = ck + (bi * s_len + slot) * kvh * d;
    float* vc = cv + (bi * s_len + slot) * kvh * d;
    const float* kp = k.typed_data() + bi * kvh * d;
    const float* vp = v.typed_data() + bi * kvh * d;
    for (int64_t j = 0; j < kvh * d; j += 2) {
      const int64_t i = (j % d) / 2;
      kc[j] = kp[j] * c[i] - kp[j + 1] * sn[i];
      kc[j + 1] = kp[j] * sn[i] + kp[j + 1] * c[i];
      vc[j] = vp[j];
      vc[j + 1] = vp[j + 1];
    }
    if (n_keys <= 0) {  // position < 0: every slot masked; the pure-JAX softmax is then uniform
      for (int64_t hi = 0; hi < h; ++hi) {
        float* o = op + (bi * h + hi) * d;
        std::fill(o, o + d, 0.0f);
        for (int64_t s = 0; s < s_len; ++s) {
          const float* vs = cv + ((bi * s_len + s) * kvh + hi / g) * d;
          for (int64_t i = 0; i < d; ++i) o[i] += vs[i] / static_cast<float>(s_len);
        }
      }
      continue;
    }
    for (int64_t hi = 0; hi < h; ++hi) {
      const int64_t kv = hi / g;
      const float* qp = q.typed_data() + (bi * h + hi) * d;
      for (int64_t i = 0; i < half; ++i) {
        qr[2 * i] = qp[2 * i] * c[i] - qp[2 * i + 1] * sn[i];
        qr[2 * i + 1] = qp[2 * i] * sn[i] + qp[2 * i + 1] * c[i];
      }
      float mx = -INFINITY;
      for (int64_t s = 0; s < n_keys; ++s) {
        const float* ks = ck + ((bi * s_len + s) * kvh + kv) * d;
        float acc = 0.0f;
        for (int64_t i = 0; i < d; ++i) acc += qr[i] * ks[i];
        scores[s] = acc * scale;
        mx = std::max(mx, scores[s]);
      }
      float sum = 0.0f;
      for (int64_t s = 0; s < n_keys; ++s) {
        scores[s] = std::exp(scores[s] - mx);
        sum += scores[s];
      }
      const float inv = 1.0f / sum;
      float* o = op + (bi * h + hi) * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t s = 0; s < n_keys; ++s) {
        const float p = scores[s] * inv;
        const float* vs = cv + ((bi * s_len + s) * kvh + kv) * d;
        for (int64_t i = 0; i < d; ++i) o[i] += p * vs[i];
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqAddRmsNorm, AddRmsNormImpl,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache_k (aliased to result 1)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache_v (aliased to result 2)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pos
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cache_k
                                  .Ret<ffi::Buffer<ffi::F32>>());  // cache_v
