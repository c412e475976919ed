// jaxquant's native int8 kernels, called from XLA as FFI custom calls (jax.ffi.ffi_call).
//
// * JqConvU8S8: a 2-D NHWC convolution, uint8 activations x int8 weights, on oneDNN. The output
//   pipeline is fbgemm's (jaxquant/kernels/requantize.py), expressed so that every step rounds
//   exactly like the pure-XLA kernel:
//     y = f32(sum x * w) + f32(-zx * colsum(w)[oc])      (int32 accumulator; the input is padded
//                                                          with zx in the call; the compensation
//                                                          is oneDNN's f32 bias argument: the add
//                                                          of two exact integers rounds once)
//     y = y + bias_over_scale[oc]                        (binary-add post-op, if a bias)
//     y = y * multiplier[oc]                             (binary-mul post-op, one f32 rounding)
//     y = round_half_even(y)                             (eltwise round post-op)
//     y = max(y, 0)                                      (eltwise ReLU post-op, if fused)
//     out = saturate(y + zo)                             (eltwise linear post-op 1 * y + zo: exact)
//   Why not oneDNN's own quantization attributes: a dst zero point or a src zero point makes
//   oneDNN 3.2 skip its brgemm AMX kernels (measured 2x slower per conv, see
//   docs/cpu_performance.md), and its scales multiply before the bias is added (another rounding
//   order than fbgemm's). zo is baked into the primitive (it is part of the cache key).
//   The weight is reordered into oneDNN's preferred blocked layout once (jq_conv_pack, at
//   convert time) and the primitives are cached per shape behind a mutex.
// * JqGemvU8S8: the decode GEMV (M <= 8 rows), an AVX512-VNNI loop over a weight packed as
//   [N/64][K/4][64][4] int8, returning the raw int32 dot (zero-point terms and the epilogue stay
//   in XLA, so results equal the pure-XLA kernel exactly).
// * JqGemvDynF32: the dynamic linear's GEMV with the activation quantization (PyTorch's
//   ChooseQuantizationParams, per tensor or per row) and the float epilogue in the same call: the
//   two dozen scalar XLA kernels that choose the qparams cost more than the 768x768 GEMV itself.
// Every float operation rounds on its own, as in XLA's kernels these must equal: no a * b + c
// contracted into one fused multiply-add (GCC contracts by default with -O3 on an FMA target).
#pragma GCC optimize("fp-contract=off")

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstring>
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

thread_local std::string g_last_error;


// cfg layout shared with jaxquant/native/ops.py (CONV_CFG_FIELDS).
enum CfgIndex {
  KH, KW, SH, SW, PT, PB, PL, PR, DH, DW, GROUPS, CIN, COUT, RELU, HAS_BIAS, DST_S8, SRC_ZP, CFG_LEN
};

struct ConvShape {
  int64_t cfg[CFG_LEN];
  int64_t n, h, w;
  int64_t zo = 0;  // output zero point, baked into the last post-op
  // Output-code clamp [clo, chi] (a following ReLU6 / Hardtanh), already intersected with the
  // output dtype's range and with clo <= chi; baked into an eltwise_clip post-op.
  int64_t clamp = 0, clo = 0, chi = 0;
  int64_t oh() const { return (h + cfg[PT] + cfg[PB] - ((cfg[KH] - 1) * cfg[DH] + 1)) / cfg[SH] + 1; }
  int64_t ow() const { return (w + cfg[PL] + cfg[PR] - ((cfg[KW] - 1) * cfg[DW] + 1)) / cfg[SW] + 1; }
  // Multiply-accumulates of the whole conv.
  int64_t macs() const {
    return n * oh() * ow() * cfg[COUT] * cfg[KH] * cfg[KW] * (cfg[CIN] / std::max<int64_t>(cfg[GROUPS], 1));
  }
  std::string key() const {
    std::string k(reinterpret_cast<const char*>(cfg), sizeof(cfg));
    int64_t nhw[7] = {n, h, w, zo, clamp, clo, chi};
    k.append(reinterpret_cast<const char*>(nhw), sizeof(nhw));
    return k;
  }
};

memory::dims weight_dims(const ConvShape& s) {
  const int64_t g = s.cfg[GROUPS], cin = s.cfg[CIN], cout = s.cfg[COUT];
  if (g == 1) return {cout, cin, s.cfg[KH], s.cfg[KW]};
  return {g, cout / g, cin / g, s.cfg[KH], s.cfg[KW]};
}

// jaxquant's (flax) weight layout (kh, kw, cin/g, cout) with cout = g * cout_g, as a strided desc.
memory::desc plain_weight_desc(const ConvShape& s) {
  const int64_t g = s.cfg[GROUPS], cin_g = s.cfg[CIN] / g, cout = s.cfg[COUT];
  const int64_t s_kw = cin_g * cout, s_kh = s.cfg[KW] * s_kw;
  if (g == 1) return memory::desc(weight_dims(s), dt::s8, memory::dims{1, cout, s_kh, s_kw});
  const int64_t cout_g = cout / g;
  return memory::desc(weight_dims(s), dt::s8, memory::dims{cout_g, 1, cout, s_kh, s_kw});
}

dnnl::convolution_forward::primitive_desc make_conv_pd(const ConvShape& s) {
  const int64_t* c = s.cfg;
  memory::desc src({s.n, c[CIN], s.h, s.w}, dt::u8, tag::nhwc);
  memory::desc dst({s.n, c[COUT], s.oh(), s.ow()}, c[DST_S8] ? dt::s8 : dt::u8, tag::nhwc);
  memory::desc wei(weight_dims(s), dt::s8, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  memory::desc per_oc({1, c[COUT], 1, 1}, dt::f32, tag::abcd);
  dnnl::post_ops po;
  // SRC_ZP (depthwise convs, whose oneDNN kernel is the same either way): oneDNN pads and
  // subtracts zx * sum(w) itself, in int32 before the f32 conversion, and the f32 bias argument
  // is bias_over_scale. Otherwise the bias argument is the compensation (above).
  if (c[SRC_ZP]) attr.set_zero_points_mask(DNNL_ARG_SRC, 0);
  if (c[HAS_BIAS] && !c[SRC_ZP]) po.append_binary(dnnl::algorithm::binary_add, per_oc);
  po.append_binary(dnnl::algorithm::binary_mul, per_oc);
  // Round before the output zero point is added: round(y) + zo, not round(y + zo) (in f32 the sum
  // can round to a .5 first: 5.499998 + 90 is 95.5). After the round both terms are integers, so
  // the linear post-op is exact.
  po.append_eltwise(dnnl::algorithm::eltwise_round, 0.f, 0.f);
  if (c[RELU]) po.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  // A clamp of the output codes to [clo, chi] (inside the dtype's range), applied to the rounded
  // value before zo is added: clip(r, clo - zo, chi - zo) + zo equals clip(saturate(r + zo), clo,
  // chi) exactly (integers in f32, and [clo, chi] lies inside the saturation range).
  if (s.clamp)
    po.append_eltwise(dnnl::algorithm::eltwise_clip, static_cast<float>(s.clo - s.zo),
                      static_cast<float>(s.chi - s.zo));
  if (s.zo != 0) po.append_eltwise(dnnl::algorithm::eltwise_linear, 1.f, static_cast<float>(s.zo));
  attr.set_post_ops(po);
  memory::dims strides{c[SH], c[SW]}, dil{c[DH] - 1, c[DW] - 1}, pl{c[PT], c[PL]}, pr{c[PB], c[PR]};
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src, wei,
      (c[SRC_ZP] && !c[HAS_BIAS]) ? memory::desc() : memory::desc({c[COUT]}, dt::f32, tag::a), dst, strides,
      dil, pl, pr, attr);
}

// The shapes the weight is packed for at convert time. The input size is not known then, and
// oneDNN's brgemm AMX kernels choose the weight blocking from the work size as well as the
// channels (measured: 32 output channels per block on small images, 64 on large ones) and accept
// no other. So the blob holds the weight in the layout of each nominal image below (each distinct
// layout once, concatenated); a call whose primitive wants yet another layout reorders the first
// one, still correct.
std::vector<ConvShape> nominal_shapes(const int64_t* cfg) {
  std::vector<ConvShape> out;
  for (int64_t side : {16, 64}) {
    ConvShape s;
    std::memcpy(s.cfg, cfg, sizeof(s.cfg));
    // The packed layouts must be a function of the weight's shape alone: the per-call choices
    // (fused ReLU, bias, output dtype, zero point) are canonicalised, so pack and call agree.
    s.cfg[RELU] = 0;
    s.cfg[HAS_BIAS] = 1;
    s.cfg[DST_S8] = 0;
    s.cfg[PT] = s.cfg[PB] = s.cfg[PL] = s.cfg[PR] = 0;
    s.n = 1;
    s.h = std::max<int64_t>(side, (cfg[KH] - 1) * cfg[DH] + 1 + cfg[SH]);
    s.w = std::max<int64_t>(side, (cfg[KW] - 1) * cfg[DW] + 1 + cfg[SW]);
    out.push_back(s);
  }
  return out;
}

// The distinct weight layouts of nominal_shapes, in blob order.
std::vector<memory::desc> packed_layouts(const int64_t* cfg) {
  std::vector<memory::desc> mds;
  for (const ConvShape& s : nominal_shapes(cfg)) {
    memory::desc md = make_conv_pd(s).weights_desc();
    bool seen = false;
    for (const auto& m : mds) seen = seen || (m == md);
    if (!seen) mds.push_back(md);
  }
  return mds;
}

size_t packed_bytes(const std::vector<memory::desc>& mds) {
  size_t n = 0;
  for (const auto& m : mds) n += m.get_size();
  return n;
}

// Convs below this many multiply-accumulates run on the calling thread: an OpenMP fork/join costs
// more than it saves there (measured with oneDNN's brgemm AMX kernel: 3.6 M MACs take 7 us on one
// thread, 13 us on two on an idle core pair, and 57 us when the other core is busy).
constexpr int64_t kSingleThreadMacs = int64_t{1} << 24;


struct ConvEntry {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward prim;
  std::vector<memory::desc> packed_mds;  // layouts in jq_conv_pack's blob
  size_t packed_size = 0;
  int64_t packed_offset = -1;  // byte offset of the layout the primitive reads, or -1: reorder
  dnnl::reorder from_packed;   // packed_mds[0] -> pd layout, per call (when packed_offset < 0)
  dnnl::reorder from_plain;    // unpacked (traced) weights: plain -> pd layout, per call
};

std::mutex g_mutex;
std::unordered_map<std::string, std::shared_ptr<ConvEntry>> g_conv_cache;

std::shared_ptr<ConvEntry> get_conv(const ConvShape& s) {
  const std::string key = s.key();
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_conv_cache.find(key);
    if (it != g_conv_cache.end()) return it->second;
  }
  auto e = std::make_shared<ConvEntry>();
  e->pd = make_conv_pd(s);
  e->packed_mds = packed_layouts(s.cfg);
  e->packed_size = packed_bytes(e->packed_mds);
  size_t offset = 0;
  for (const auto& md : e->packed_mds) {
    if (md == e->pd.weights_desc()) {
      e->packed_offset = static_cast<int64_t>(offset);
      break;
    }
    offset += md.get_size();
  }
  e->prim = dnnl::convolution_forward(e->pd);
  if (e->packed_offset < 0)
    e->from_packed = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), e->packed_mds[0], cpu_engine(),
                                                                 e->pd.weights_desc()));
  e->from_plain = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), plain_weight_desc(s),
                                                              cpu_engine(), e->pd.weights_desc()));
  std::lock_guard<std::mutex> lock(g_mutex);
  auto inserted = g_conv_cache.emplace(key, e);
  return inserted.first->second;
}

// What one thread needs to run one cached primitive: the oneDNN memory objects and the argument
// map, built on the first call and re-pointed at each call's buffers (set_data_handle) instead of
// created again. Per thread because memory objects are not thread-safe; the map is keyed like the
// primitive cache, so the lookup takes no lock.
struct ConvCall {
  std::shared_ptr<ConvEntry> e;
  memory m_src, m_wei, m_dst, m_scr, m_bias, m_po_bias, m_po_mult, m_zx;
  int32_t zx = 0;  // m_zx reads it
  std::unordered_map<int, memory> args;
};

ConvCall& get_call(const ConvShape& s) {
  thread_local std::unordered_map<std::string, std::unique_ptr<ConvCall>> calls;
  const std::string key = s.key();
  auto it = calls.find(key);
  if (it != calls.end()) return *it->second;
  auto call = std::make_unique<ConvCall>();
  ConvCall& c = *call;
  c.e = get_conv(s);
  auto& eng = cpu_engine();
  const auto& pd = c.e->pd;
  c.m_src = memory(pd.src_desc(), eng, nullptr);
  c.m_wei = memory(pd.weights_desc(), eng, nullptr);
  c.m_dst = memory(pd.dst_desc(), eng, nullptr);
  c.m_scr = memory(pd.scratchpad_desc(), eng, nullptr);
  c.args = {{DNNL_ARG_SRC, c.m_src}, {DNNL_ARG_WEIGHTS, c.m_wei}, {DNNL_ARG_DST, c.m_dst},
            {DNNL_ARG_SCRATCHPAD, c.m_scr}};
  memory::desc per_oc({1, s.cfg[COUT], 1, 1}, dt::f32, tag::abcd);
  if (s.cfg[SRC_ZP]) {
    c.m_zx = memory(memory::desc({1}, dt::s32, tag::a), eng, &c.zx);
    c.args.emplace(DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC, c.m_zx);
  }
  if (!s.cfg[SRC_ZP] || s.cfg[HAS_BIAS]) {
    c.m_bias = memory(pd.bias_desc(), eng, nullptr);
    c.args.emplace(DNNL_ARG_BIAS, c.m_bias);
  }
  int post_op = 0;
  if (s.cfg[HAS_BIAS] && !s.cfg[SRC_ZP]) {
    c.m_po_bias = memory(per_oc, eng, nullptr);
    c.args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(post_op++) | DNNL_ARG_SRC_1, c.m_po_bias);
  }
  c.m_po_mult = memory(per_oc, eng, nullptr);
  c.args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(post_op) | DNNL_ARG_SRC_1, c.m_po_mult);
  return *calls.emplace(key, std::move(call)).first->second;
}

// vecs is float32 (3, cout): the compensation f32(-zx * colsum), bias / (x_scale * w_scale) and the
// multiplier x_scale * w_scale / out_scale, computed by XLA in one small kernel (XLA's own float
// rounding: it turns a division by a constant scale into a multiplication by its reciprocal, which
// the call must follow to stay equal to the pure-XLA kernel). Regular convs pad the input with zx
// here, instead of in an XLA pad kernel that writes a padded copy. clamp, when given, is int32 (2,):
// the output codes are clipped to [clamp[0], clamp[1]] after the saturation (what a following
// quantized ReLU6 does with these output qparams).
ffi::Error ConvCore(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer vecs, ffi::AnyBuffer zx,
                    ffi::AnyBuffer zo, const ffi::AnyBuffer* clamp, ffi::Result<ffi::AnyBuffer> y,
                    ffi::Span<const int64_t> cfg, int64_t packed) {
  if (cfg.size() != CFG_LEN) return ffi::Error::InvalidArgument("JqConvU8S8: cfg has the wrong length");
  auto xd = x.dimensions();
  if (xd.size() != 4 || x.element_type() != ffi::DataType::U8)
    return ffi::Error::InvalidArgument("JqConvU8S8: x must be uint8 (N, H, W, C)");
  ConvShape s;
  std::memcpy(s.cfg, cfg.begin(), sizeof(s.cfg));
  s.n = xd[0];
  s.h = xd[1];
  s.w = xd[2];
  if (xd[3] != s.cfg[CIN]) return ffi::Error::InvalidArgument("JqConvU8S8: input channels mismatch");
  const int64_t cout = s.cfg[COUT];
  for (int i = PT; i <= PR; ++i)
    if (s.cfg[i] < 0 || s.cfg[i] > (int64_t{1} << 24))
      return ffi::Error::InvalidArgument("JqConvU8S8: padding out of range");
  if (s.cfg[GROUPS] < 1 || s.cfg[CIN] % s.cfg[GROUPS] || cout % s.cfg[GROUPS] || s.oh() < 1 || s.ow() < 1)
    return ffi::Error::InvalidArgument("JqConvU8S8: inconsistent conv config");
  auto yd = y->dimensions();
  const ffi::DataType want_y = s.cfg[DST_S8] ? ffi::DataType::S8 : ffi::DataType::U8;
  if (yd.size() != 4 || yd[0] != s.n || yd[1] != s.oh() || yd[2] != s.ow() || yd[3] != cout ||
      y->element_type() != want_y)
    return ffi::Error::InvalidArgument("JqConvU8S8: output shape or dtype does not match the conv");
  if (vecs.element_type() != ffi::DataType::F32 || static_cast<int64_t>(vecs.element_count()) != 3 * cout)
    return ffi::Error::InvalidArgument("JqConvU8S8: the per-channel vectors must be float32 (3, cout)");
  if (zo.element_type() != ffi::DataType::S32 || zo.element_count() != 1 ||
      zx.element_type() != ffi::DataType::S32 || zx.element_count() != 1)
    return ffi::Error::InvalidArgument("JqConvU8S8: the zero points must be one int32 each");
  s.zo = *static_cast<const int32_t*>(zo.untyped_data());
  if (s.zo < -255 || s.zo > 255)  // a uint8/int8 zero point; also bounds the number of cached primitives
    return ffi::Error::InvalidArgument("JqConvU8S8: the output zero point is out of the 8-bit range");
  const int32_t zx_v = *static_cast<const int32_t*>(zx.untyped_data());
  if (zx_v < 0 || zx_v > 255)
    return ffi::Error::InvalidArgument("JqConvU8S8: the input zero point is out of the uint8 range");
  if (clamp != nullptr) {
    if (clamp->element_type() != ffi::DataType::S32 || clamp->element_count() != 2)
      return ffi::Error::InvalidArgument("JqConvU8S8Clamp: the clamp must be int32 (2,): lowest and highest code");
    const int32_t* b = static_cast<const int32_t*>(clamp->untyped_data());
    // clip(saturate(v), lo, hi) then saturate == clip(v, L, H) with L, H the bounds intersected
    // with the dtype's range and L <= H (lo > hi gives hi, as jnp.clip does). This also bounds
    // the number of cached primitives.
    const int64_t qmin = s.cfg[DST_S8] ? -128 : 0, qmax = s.cfg[DST_S8] ? 127 : 255;
    s.chi = std::min<int64_t>(std::max<int64_t>(b[1], qmin), qmax);
    s.clo = std::min<int64_t>(std::min<int64_t>(std::max<int64_t>(b[0], qmin), qmax), s.chi);
    s.clamp = 1;
  }
  // Regular convs: the input is padded here with zx and oneDNN runs unpadded (see the top comment).
  const bool pad_here = !s.cfg[SRC_ZP] && (s.cfg[PT] || s.cfg[PB] || s.cfg[PL] || s.cfg[PR]);
  const int64_t pt = s.cfg[PT], pl = s.cfg[PL], h0 = s.h, w0 = s.w, c = s.cfg[CIN];
  if (pad_here) {
    s.h += s.cfg[PT] + s.cfg[PB];
    s.w += s.cfg[PL] + s.cfg[PR];
    s.cfg[PT] = s.cfg[PB] = s.cfg[PL] = s.cfg[PR] = 0;
  }
  float* comp_v = static_cast<float*>(vecs.untyped_data());
  float* bos_v = comp_v + cout;
  float* mult_v = comp_v + 2 * cout;
  try {
    OmpThreads threads(s.macs() < kSingleThreadMacs);
    ConvCall& call = get_call(s);
    ConvEntry& e = *call.e;
    auto& eng = cpu_engine();
    const size_t want_w = packed ? e.packed_size : plain_weight_desc(s).get_size();
    if (weight.size_bytes() != want_w)
      return ffi::Error::InvalidArgument("JqConvU8S8: the weight blob has the wrong size for this conv");
    thread_local dnnl::stream stream(cpu_engine());
    thread_local std::vector<uint8_t> scratch, wbuf, xbuf;
    const memory::desc& wmd = e.pd.weights_desc();
    void* wptr = weight.untyped_data();
    if (packed && e.packed_offset >= 0) {
      wptr = static_cast<uint8_t*>(wptr) + e.packed_offset;
    } else {
      wbuf.resize(wmd.get_size());
      memory src_w(packed ? e.packed_mds[0] : plain_weight_desc(s), eng, wptr);
      memory dst_w(wmd, eng, wbuf.data());
      (packed ? e.from_packed : e.from_plain).execute(stream, src_w, dst_w);
      wptr = wbuf.data();
    }
    void* xptr = x.untyped_data();
    if (pad_here) {
      // Each padded row written once: zx in the borders, the input row in the middle; rows split
      // over the OpenMP threads once the copy is large (a batch of big images).
      xbuf.resize(static_cast<size_t>(s.n * s.h * s.w * c));
      const uint8_t* xsrc = static_cast<const uint8_t*>(x.untyped_data());
      uint8_t* xdst = xbuf.data();
      const uint8_t fill = static_cast<uint8_t>(zx_v);
      const int64_t rows = s.n * s.h, row_bytes = s.w * c, pr = s.w - pl - w0;
      const int pad_threads = rows * row_bytes >= (int64_t{1} << 21) ? omp_get_max_threads() : 1;
#pragma omp parallel for num_threads(pad_threads) schedule(static) if (pad_threads > 1)
      for (int64_t row = 0; row < rows; ++row) {
        uint8_t* d = xdst + row * row_bytes;
        const int64_t b = row / s.h, r = row % s.h - pt;
        if (r < 0 || r >= h0) {
          std::memset(d, fill, row_bytes);
        } else {
          std::memset(d, fill, pl * c);
          std::memcpy(d + pl * c, xsrc + (b * h0 + r) * w0 * c, w0 * c);
          std::memset(d + (pl + w0) * c, fill, pr * c);
        }
      }
      xptr = xbuf.data();
    }
    scratch.resize(std::max<size_t>(e.pd.scratchpad_desc().get_size(), 1));
    call.m_src.set_data_handle(xptr);
    call.m_wei.set_data_handle(wptr);
    call.m_dst.set_data_handle(y->untyped_data());
    call.m_scr.set_data_handle(scratch.data());
    if (s.cfg[SRC_ZP]) {
      call.zx = zx_v;
      if (s.cfg[HAS_BIAS]) call.m_bias.set_data_handle(bos_v);
    } else {
      call.m_bias.set_data_handle(comp_v);
    }
    if (s.cfg[HAS_BIAS] && !s.cfg[SRC_ZP]) call.m_po_bias.set_data_handle(bos_v);
    call.m_po_mult.set_data_handle(mult_v);
    e.prim.execute(stream, call.args);
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvImpl(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer vecs, ffi::AnyBuffer zx,
                    ffi::AnyBuffer zo, ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> cfg, int64_t packed) {
  return ConvCore(x, weight, vecs, zx, zo, nullptr, y, cfg, packed);
}

ffi::Error ConvClampImpl(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer vecs, ffi::AnyBuffer zx,
                         ffi::AnyBuffer zo, ffi::AnyBuffer clamp, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Span<const int64_t> cfg, int64_t packed) {
  return ConvCore(x, weight, vecs, zx, zo, &clamp, y, cfg, packed);
}

// ------------------------------------------------------------------------------------ GEMV

constexpr int kCols = 64;  // output columns per packed group: 4 zmm of 16 int32 lanes

// MR rows x 64 columns. For MR <= 2 the K loop keeps two accumulator sets (even / odd k) so that
// the dependent dpbusd chain (latency ~5 cycles) does not bound the loop.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void gemv_group(
    const uint8_t* x, int64_t ldx, const int8_t* wg, int64_t kb, int32_t* out, int64_t ldo, int64_t ncols) {
  constexpr int SETS = MR <= 2 ? 2 : 1;
  __m512i acc[SETS][MR][4];
  for (int s = 0; s < SETS; ++s)
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < 4; ++j) acc[s][m][j] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + SETS <= kb; k += SETS) {
    for (int s = 0; s < SETS; ++s) {
      const int8_t* wk = wg + (k + s) * (kCols * 4);
      __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 64);
      __m512i w2 = _mm512_loadu_si512(wk + 128), w3 = _mm512_loadu_si512(wk + 192);
      for (int m = 0; m < MR; ++m) {
        int32_t xv;
        std::memcpy(&xv, x + m * ldx + 4 * (k + s), 4);
        __m512i xb = _mm512_set1_epi32(xv);
        acc[s][m][0] = _mm512_dpbusd_epi32(acc[s][m][0], xb, w0);
        acc[s][m][1] = _mm512_dpbusd_epi32(acc[s][m][1], xb, w1);
        acc[s][m][2] = _mm512_dpbusd_epi32(acc[s][m][2], xb, w2);
        acc[s][m][3] = _mm512_dpbusd_epi32(acc[s][m][3], xb, w3);
      }
    }
  }
  for (; k < kb; ++k) {  // odd tail of the unrolled loop
    const int8_t* wk = wg + k * (kCols * 4);
    for (int m = 0; m < MR; ++m) {
      int32_t xv;
      std::memcpy(&xv, x + m * ldx + 4 * k, 4);
      __m512i xb = _mm512_set1_epi32(xv);
      for (int j = 0; j < 4; ++j)
        acc[0][m][j] = _mm512_dpbusd_epi32(acc[0][m][j], xb, _mm512_loadu_si512(wk + 64 * j));
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < 4; ++j)
      for (int s = 1; s < SETS; ++s) acc[0][m][j] = _mm512_add_epi32(acc[0][m][j], acc[s][m][j]);
    if (ncols == kCols) {
      for (int j = 0; j < 4; ++j) _mm512_storeu_si512(out + m * ldo + 16 * j, acc[0][m][j]);
    } else {
      alignas(64) int32_t tmp[kCols];
      for (int j = 0; j < 4; ++j) _mm512_store_si512(tmp + 16 * j, acc[0][m][j]);
      std::memcpy(out + m * ldo, tmp, ncols * sizeof(int32_t));
    }
  }
}

void gemv_rows(const uint8_t* x, int64_t ldx, int64_t rows, const int8_t* wg, int64_t kb, int32_t* out,
               int64_t ldo, int64_t ncols) {
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const int64_t mr = std::min<int64_t>(4, rows - m0);
    const uint8_t* xm = x + m0 * ldx;
    int32_t* om = out + m0 * ldo;
    switch (mr) {
      case 1: gemv_group<1>(xm, ldx, wg, kb, om, ldo, ncols); break;
      case 2: gemv_group<2>(xm, ldx, wg, kb, om, ldo, ncols); break;
      case 3: gemv_group<3>(xm, ldx, wg, kb, om, ldo, ncols); break;
      default: gemv_group<4>(xm, ldx, wg, kb, om, ldo, ncols); break;
    }
  }
}

// acc (M, N) int32 = x (M, K) uint8 @ the packed weight, on up to omp_get_max_threads() threads. x rows
// are ldx >= 4 * kb bytes apart and zero beyond K.
void gemv_compute(const uint8_t* xp, int64_t ldx, int64_t m, const int8_t* w, int64_t kb, int64_t n,
                  int32_t* out) {
  const int64_t groups = (n + kCols - 1) / kCols;
  // Threads only pay off once the weight is large enough (a parallel region costs a few us).
  const int threads = (n * kb * 4 >= (1 << 20)) ? std::min<int64_t>(omp_get_max_threads(), groups) : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < groups; ++g)
    gemv_rows(xp, ldx, m, w + g * kb * kCols * 4, kb, out + g * kCols, n,
              std::min<int64_t>(kCols, n - g * kCols));
}

ffi::Error GemvImpl(ffi::AnyBuffer x, ffi::AnyBuffer wp, ffi::Result<ffi::AnyBuffer> acc) {
  auto xd = x.dimensions();
  auto od = acc->dimensions();
  if (xd.size() != 2 || od.size() != 2 || xd[0] != od[0] || x.element_type() != ffi::DataType::U8 ||
      acc->element_type() != ffi::DataType::S32)
    return ffi::Error::InvalidArgument("JqGemvU8S8: expects uint8 x (M, K) and int32 out (M, N)");
  const int64_t m = xd[0], k = xd[1], n = od[1];
  const int64_t kb = (k + 3) / 4, groups = (n + kCols - 1) / kCols;
  if (static_cast<int64_t>(wp.size_bytes()) != groups * kb * kCols * 4)
    return ffi::Error::InvalidArgument("JqGemvU8S8: packed weight size does not match (M, K) x (K, N)");
  const uint8_t* xp = static_cast<const uint8_t*>(x.untyped_data());
  int64_t ldx = k;
  thread_local std::vector<uint8_t> xpad;
  if (k % 4) {  // pad each row to a multiple of 4 with zeros (the packed weight is zero there too)
    ldx = kb * 4;
    xpad.assign(m * ldx, 0);
    for (int64_t r = 0; r < m; ++r) std::memcpy(xpad.data() + r * ldx, xp + r * k, k);
    xp = xpad.data();
  }
  gemv_compute(xp, ldx, m, static_cast<const int8_t*>(wp.untyped_data()), kb, n,
               static_cast<int32_t*>(acc->untyped_data()));
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------- dynamic GEMV

// PyTorch's quant_utils::ChooseQuantizationParams (ATen QuantUtils.h, what fbgemm's dynamic linear
// calls): intermediate values in double, the scale rounded to float once. jaxquant/choose_qparams.py
// computes the same numbers with float32 pairs.
struct QParams {
  float scale;
  int32_t zero_point;
};

QParams choose_qparams(float lo, float hi, int32_t qmin, int32_t qmax) {
  constexpr float kSmallScale = 6.1e-5f;
  lo = std::min(lo, 0.f);
  hi = std::max(hi, 0.f);
  double scale = (static_cast<double>(hi) - lo) / (qmax - qmin);
  if (static_cast<float>(scale) == 0.0f || std::isinf(1.0f / static_cast<float>(scale))) scale = 0.1;
  if (scale < kSmallScale) {
    const float org_scale = static_cast<float>(scale);
    scale = kSmallScale;
    if (lo == 0.0f) {
      hi = kSmallScale * (qmax - qmin);
    } else if (hi == 0.0f) {
      lo = -kSmallScale * (qmax - qmin);
    } else {
      const float amplifier = kSmallScale / org_scale;
      lo *= amplifier;
      hi *= amplifier;
    }
  }
  const double zp_from_min = qmin - lo / scale, zp_from_max = qmax - hi / scale;
  const double err_min = std::abs(qmin) - std::abs(lo / scale);
  const double err_max = std::abs(qmax) - std::abs(hi / scale);
  const double initial = err_min < err_max ? zp_from_min : zp_from_max;
  int32_t zp = 0;
  if (initial < qmin) {
    zp = qmin;
  } else if (initial > qmax) {
    zp = qmax;
  } else if (std::isfinite(initial)) {  // NaN input: the scale is NaN too, so is every output
    zp = static_cast<int32_t>(std::nearbyint(initial));
  }
  return {static_cast<float>(scale), zp};
}

// min and max of n >= 1 floats; a NaN anywhere makes both NaN (as jnp.min / jnp.max).
__attribute__((target("avx512f"))) void min_max(const float* x, int64_t n, float* lo, float* hi) {
  __m512 vlo = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 vhi = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  float a = _mm512_reduce_min_ps(vlo), b = _mm512_reduce_max_ps(vhi);
  bool any_nan = nan != 0;
  for (; i < n; ++i) {
    a = std::min(a, x[i]);
    b = std::max(b, x[i]);
    any_nan |= std::isnan(x[i]);
  }
  if (any_nan) a = b = std::numeric_limits<float>::quiet_NaN();
  *lo = a;
  *hi = b;
}

// q = clip(round_half_even(x * inv + zp), 0, qmax) as uint8. The multiply-add is one fused
// multiply-add: XLA:CPU contracts the pure-XLA kernel's `x2 * (1 / scale) + zp` into one
// (measured: ties round differently otherwise).
__attribute__((target("avx512f,avx512bw,fma"))) void quantize_row(const float* x, int64_t k, float inv, float zp,
                                                                 float qmax, uint8_t* q) {
  const __m512 vinv = _mm512_set1_ps(inv), vzp = _mm512_set1_ps(zp);
  const __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), vinv, vzp);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);  // max_ps(NaN, 0) is 0
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  for (; i < k; ++i) {
    float v = std::nearbyint(__builtin_fmaf(x[i], inv, zp));
    v = std::min(std::max(v, 0.0f), qmax);
    q[i] = static_cast<uint8_t>(v == v ? v : 0.0f);
  }
}

// fbgemm's dynamic linear for M <= a few rows, in one custom call: the activation's qparams (one
// pair, or one per row with per_token), its quantization to uint8, the VNNI GEMV and the float
// epilogue. Every float step is the pure-XLA kernel's (jaxquant/kernels/linear.py
// quantized_linear_dynamic) in the same order and with the same roundings (one fused multiply-add
// in the quantization, where XLA contracts; none elsewhere, see the pragma at the top), so the
// outputs are equal.
ffi::Error GemvDynImpl(ffi::AnyBuffer x, ffi::AnyBuffer wp, ffi::AnyBuffer colsum, ffi::AnyBuffer w_scale,
                       ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y, int64_t reduce_range, int64_t per_token,
                       int64_t relu, int64_t has_bias, int64_t fma_epilogue) {
  auto xd = x.dimensions();
  auto od = y->dimensions();
  if (xd.size() != 2 || od.size() != 2 || xd[0] != od[0] || xd[1] < 1 || x.element_type() != ffi::DataType::F32 ||
      y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("JqGemvDynF32: expects float32 x (M, K) and float32 out (M, N)");
  const int64_t m = xd[0], k = xd[1], n = od[1];
  const int64_t kb = (k + 3) / 4, groups = (n + kCols - 1) / kCols;
  if (static_cast<int64_t>(wp.size_bytes()) != groups * kb * kCols * 4)
    return ffi::Error::InvalidArgument("JqGemvDynF32: packed weight size does not match (M, K) x (K, N)");
  if (colsum.element_type() != ffi::DataType::S32 || static_cast<int64_t>(colsum.element_count()) != n ||
      w_scale.element_type() != ffi::DataType::F32 || static_cast<int64_t>(w_scale.element_count()) != n ||
      bias.element_type() != ffi::DataType::F32 || static_cast<int64_t>(bias.element_count()) != n)
    return ffi::Error::InvalidArgument("JqGemvDynF32: colsum, w_scale and bias must be (N,) int32/float32/float32");
  const float* xf = static_cast<const float*>(x.untyped_data());
  const int32_t qmax = reduce_range ? 127 : 255;
  thread_local std::vector<QParams> qp;
  qp.resize(m);
  if (per_token) {
    for (int64_t r = 0; r < m; ++r) {
      float lo, hi;
      min_max(xf + r * k, k, &lo, &hi);
      qp[r] = choose_qparams(lo, hi, 0, qmax);
    }
  } else {
    float lo, hi;
    min_max(xf, m * k, &lo, &hi);
    std::fill(qp.begin(), qp.end(), choose_qparams(lo, hi, 0, qmax));
  }
  // q = clip(round(x * (1 / scale) + zp), 0, qmax), rows padded with zeros to 4 * kb
  const int64_t ldx = kb * 4;
  thread_local std::vector<uint8_t> xq;
  thread_local std::vector<int32_t> acc;
  xq.assign(m * ldx, 0);
  acc.resize(m * n);
  for (int64_t r = 0; r < m; ++r) {
    const float inv = 1.0f / qp[r].scale, zp = static_cast<float>(qp[r].zero_point);
    quantize_row(xf + r * k, k, inv, zp, static_cast<float>(qmax), xq.data() + r * ldx);
  }
  gemv_compute(xq.data(), ldx, m, static_cast<const int8_t*>(wp.untyped_data()), kb, n, acc.data());
  // y = f32(acc - zx * colsum) * (x_scale * w_scale) + bias, then ReLU
  const int32_t* cs = static_cast<const int32_t*>(colsum.untyped_data());
  const float* ws = static_cast<const float*>(w_scale.untyped_data());
  const float* b = static_cast<const float*>(bias.untyped_data());
  float* out = static_cast<float*>(y->untyped_data());
  for (int64_t r = 0; r < m; ++r) {
    const int32_t zx = qp[r].zero_point;
    const float s = qp[r].scale;
    const int32_t* ar = acc.data() + r * n;
    float* yr = out + r * n;
    for (int64_t j = 0; j < n; ++j) {
      const float a = static_cast<float>(ar[j] - zx * cs[j]), sw = s * ws[j];
      float v = !has_bias ? a * sw : (fma_epilogue ? __builtin_fmaf(a, sw, b[j]) : a * sw + b[j]);
      if (relu) v = std::max(v, 0.0f);
      yr[j] = v;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqConvU8S8, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("cfg")
                                  .Attr<int64_t>("packed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqConvU8S8Clamp, ConvClampImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("cfg")
                                  .Attr<int64_t>("packed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqGemvU8S8, GemvImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqGemvDynF32, GemvDynImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("reduce_range")
                                  .Attr<int64_t>("per_token")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("fma_epilogue"));

extern "C" {

// 1 when this CPU runs the VNNI GEMV.
int jq_gemv_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

const char* jq_last_error() { return g_last_error.c_str(); }

// Bytes of the packed conv weight for cfg (CFG_LEN int64), or -1 (see jq_last_error).
int64_t jq_conv_packed_size(const int64_t* cfg) {
  try {
    return static_cast<int64_t>(packed_bytes(packed_layouts(cfg)));
  } catch (const dnnl::error& err) {
    g_last_error = err.what();
    return -1;
  }
}

// Name of the oneDNN implementation for cfg at batch n and image h x w (e.g. "brg:avx512_core_amx").
int jq_conv_impl_name(const int64_t* cfg, int64_t n, int64_t h, int64_t w, char* out, int64_t out_len) {
  try {
    ConvShape s;
    std::memcpy(s.cfg, cfg, sizeof(s.cfg));
    s.n = n;
    s.h = h;
    s.w = w;
    OmpThreads threads(s.macs() < kSingleThreadMacs);
    std::string name(get_conv(s)->pd.impl_info_str());
    std::snprintf(out, out_len, "%s", name.c_str());
    return 0;
  } catch (const dnnl::error& err) {
    g_last_error = err.what();
    return -1;
  }
}

// Reorder the int8 weight (kh, kw, cin/g, cout) into oneDNN's layout; out holds jq_conv_packed_size bytes.
int jq_conv_pack(const int64_t* cfg, const int8_t* w, uint8_t* out, int64_t out_size) {
  try {
    const std::vector<memory::desc> mds = packed_layouts(cfg);
    if (static_cast<int64_t>(packed_bytes(mds)) != out_size) {
      g_last_error = "packed size mismatch";
      return -1;
    }
    dnnl::stream stream(cpu_engine());
    memory src(plain_weight_desc(nominal_shapes(cfg)[0]), cpu_engine(), const_cast<int8_t*>(w));
    size_t offset = 0;
    for (const auto& md : mds) {
      memory dst(md, cpu_engine(), out + offset);
      dnnl::reorder(src, dst).execute(stream, src, dst);
      offset += md.get_size();
    }
    stream.wait();
    return 0;
  } catch (const dnnl::error& err) {
    g_last_error = err.what();
    return -1;
  }
}

}  // extern "C"
