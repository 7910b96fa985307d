// The fused epilogue of the expanded block on the CPU (expcuda/nn/epilogue.py documents it).
//
// z (N, C, H, W), contiguous float32, holds the stacked convolution output: channels
// [0, c_lp) the low-precision branch, [c_lp, C) the full-precision branch (none when
// C == c_lp).  Forward: one pass for the batch statistics, one pass that normalizes,
// applies phi and Qa (LP), psi and f (FP) and combines.  Backward: one pass for the
// per-channel sums BatchNorm's backward needs (and LSQ's step gradient), one pass that
// writes dz; the intermediate values are recomputed from z instead of being stored.
// The arithmetic repeats epilogue_fwd_torch / epilogue_bwd_torch operation for operation
// in float32; only the sums differ (double here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "common/codes.h"
#include "common/epilogue_math.h"
#include "common/quant_math.h"

// the 8-float vectors below only cross inlined calls, so the ABI note does not apply
#pragma GCC diagnostic ignored "-Wpsabi"

namespace expcuda {
namespace {

using at::Tensor;

// Combine, AQuant and Phi: common/codes.h, generated from expcuda/codes.py

struct Cfg {
  int64_t n, c_tot, c_lp, c_out, hw;
  int64_t scheme, combine, aq, phi, psi, bits;
  float f, levels, step, qp;
  bool fp;
};

struct Norm {  // y = ((z - mean) * invstd) * w + b, as the reference orders it
  std::vector<float> mean, invstd, w, b;
};

Cfg make_cfg(const Tensor& z, const Tensor& f, const c10::optional<Tensor>& step, int64_t c_lp,
             int64_t scheme, int64_t combine, int64_t a_quant, int64_t a_bits, int64_t phi,
             int64_t psi) {
  TORCH_CHECK(z.numel() > 0, "block_epilogue: z must be non-empty (an empty batch has no statistics)");
  TORCH_CHECK(z.dim() == 4 && z.scalar_type() == at::kFloat &&
                  (z.is_contiguous() || z.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "block_epilogue: z must be a float32 (N, C, H, W) tensor, contiguous or channels_last");
  Cfg c;
  c.n = z.size(0);
  c.c_tot = z.size(1);
  c.c_lp = c_lp;
  c.hw = z.size(2) * z.size(3);
  c.fp = c.c_tot > c_lp;
  TORCH_CHECK(c_lp > 0 && c_lp <= c.c_tot, "block_epilogue: bad c_lp");
  TORCH_CHECK(!c.fp || combine == kConcat || c.c_tot == 2 * c_lp,
              "block_epilogue: add/sub need as many FP channels as LP channels");
  c.c_out = (!c.fp || combine == kConcat) ? c.c_tot : c_lp;
  c.scheme = scheme;
  c.combine = combine;
  c.aq = a_quant;
  c.phi = phi;
  c.psi = psi;
  c.bits = a_bits;
  c.f = f.item<float>();
  c.levels = a_bits == 32 ? 1.f : qm::levels(a_bits);
  c.qp = c.levels;
  c.step = 1.f;
  if (a_quant == kLsq) {
    TORCH_CHECK(step.has_value(), "block_epilogue: LSQ needs its step");
    c.step = step->item<float>();
  }
  return c;
}

Norm make_norm(const Tensor& weight, const Tensor& bias, const Tensor& mean, const Tensor& var,
               double eps) {
  Norm nm;
  int64_t ch = mean.numel();
  Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  Tensor invstd = at::rsqrt(var + eps).contiguous();
  nm.mean.assign(mean.data_ptr<float>(), mean.data_ptr<float>() + ch);
  nm.invstd.assign(invstd.data_ptr<float>(), invstd.data_ptr<float>() + ch);
  nm.w.assign(w.data_ptr<float>(), w.data_ptr<float>() + ch);
  nm.b.assign(b.data_ptr<float>(), b.data_ptr<float>() + ch);
  return nm;
}

void check_stats(const Tensor& mean, const Tensor& var, const Cfg& c) {
  TORCH_CHECK(mean.scalar_type() == at::kFloat && var.scalar_type() == at::kFloat &&
                  mean.is_contiguous() && var.is_contiguous() && mean.numel() == c.c_tot &&
                  var.numel() == c.c_tot,
              "block_epilogue: mean and var must be contiguous float32 tensors of C elements");
}

// ----------------------------------------------------------------------------- row kernels
// Each is one simple loop over a row of H*W elements with the kind chosen outside the
// loop, so the compiler vectorizes it; rows stay in L1 between the steps.  The build
// targets baseline x86-64, so the kernels are also compiled for AVX2 and picked at load
// time (GCC function multiversioning).  Sums use 16 independent float lanes: the
// compiler may not reorder one running sum, but it vectorizes independent lanes.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROW_KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define ROW_KERNEL
#endif

constexpr int kLanes = 16;

ROW_KERNEL float row_sum(const float* x, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[k + j];
  float s = 0.f;
  for (; k < n; ++k) s += x[k];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

typedef float v8f_ __attribute__((vector_size(32)));

// sums of d = x - m and of d^2 over a row (8-float vector lanes)
ROW_KERNEL void row_moments(const float* x, float m, int64_t n, float& s1, float& s2) {
  v8f_ a = {0, 0, 0, 0, 0, 0, 0, 0}, b = a, mv = a + m;
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    v8f_ v;
    __builtin_memcpy(&v, x + k, sizeof(v));
    v8f_ d = v - mv;
    a += d;
    b += d * d;
  }
  float s = 0.f, ss = 0.f;
  for (; k < n; ++k) {
    float d = x[k] - m;
    s += d;
    ss += d * d;
  }
  for (int j = 0; j < 8; ++j) {
    s += a[j];
    ss += b[j];
  }
  s1 = s;
  s2 = ss;
}

// sum of g and of g * xhat over a row, xhat = (z - m) * is
ROW_KERNEL void row_sums_bwd(const float* z, const float* g, float m, float is, int64_t n,
                             float& sg, float& sgx) {
  float a[kLanes] = {0.f}, b[kLanes] = {0.f};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      a[j] += g[k + j];
      b[j] += g[k + j] * ((z[k + j] - m) * is);
    }
  float s = 0.f, sx = 0.f;
  for (; k < n; ++k) {
    s += g[k];
    sx += g[k] * ((z[k] - m) * is);
  }
  for (int j = 0; j < kLanes; ++j) {
    s += a[j];
    sx += b[j];
  }
  sg = s;
  sgx = sx;
}

ROW_KERNEL void row_dz(const float* z, const float* g, float m, float is, float sc, float am,
                       float bm, float* d, int64_t n) {
  for (int64_t k = 0; k < n; ++k) d[k] = sc * (g[k] - am - ((z[k] - m) * is) * bm);
}

ROW_KERNEL void normalize(const Norm& nm, int64_t ch, const float* z, float* y, int64_t n) {
  const float m = nm.mean[ch], is = nm.invstd[ch], w = nm.w[ch], b = nm.b[ch];
  for (int64_t k = 0; k < n; ++k) y[k] = em::bn(z[k], m, is, w, b);
}

ROW_KERNEL void phi_row(int64_t kind, const float* y, float* u, int64_t n) {
  if (kind == kRelu) {
    for (int64_t k = 0; k < n; ++k) u[k] = em::relu(y[k]);
  } else if (kind == kClip) {
    for (int64_t k = 0; k < n; ++k) u[k] = em::clip01(y[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) u[k] = y[k];
  }
}

// out = keep_phi(y) ? g * scale : 0  (scale = 1 or f)
ROW_KERNEL void phi_grad_row(int64_t kind, const float* y, const float* g, float scale, bool scaled, float* out,
                  int64_t n) {
  if (kind == kRelu) {
    for (int64_t k = 0; k < n; ++k) out[k] = em::relu_keep(y[k]) ? (scaled ? g[k] * scale : g[k]) : 0.f;
  } else if (kind == kClip) {
    for (int64_t k = 0; k < n; ++k) out[k] = em::clip01_keep(y[k]) ? (scaled ? g[k] * scale : g[k]) : 0.f;
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = scaled ? g[k] * scale : g[k];
  }
}

ROW_KERNEL void qa_row(const Cfg& c, const float* u, float* out, int64_t n) {
  switch (c.aq) {
    case kDorefa:
      if (c.bits == 32) {
        for (int64_t k = 0; k < n; ++k) out[k] = em::clip01(u[k]);
      } else {
        const float lv = c.levels;
        for (int64_t k = 0; k < n; ++k) out[k] = qm::dorefa_act(u[k], lv);
      }
      break;
    case kSign:
      for (int64_t k = 0; k < n; ++k) out[k] = qm::sign(u[k]);
      break;
    case kLsq: {
      const float s = c.step, qp = c.qp;
      for (int64_t k = 0; k < n; ++k) out[k] = qm::lsq_fwd(u[k], s, 0.f, qp);
      break;
    }
    default:
      for (int64_t k = 0; k < n; ++k) out[k] = u[k];
  }
}

// Qa's STE on input u: gu = keep(u) ? g : 0; returns LSQ's step-gradient sum over the row.
ROW_KERNEL double qa_grad_row(const Cfg& c, const float* u, const float* g, float* gu, int64_t n) {
  switch (c.aq) {
    case kDorefa:
      for (int64_t k = 0; k < n; ++k) gu[k] = qm::dorefa_act_keep(u[k]) ? g[k] : 0.f;
      return 0;
    case kSign:
      for (int64_t k = 0; k < n; ++k) gu[k] = qm::sign_act_keep(u[k]) ? g[k] : 0.f;
      return 0;
    case kLsq: {
      const float s = c.step, qp = c.qp;
      double ds = 0;
      for (int64_t k = 0; k < n; ++k) {
        float term = 0.f;
        gu[k] = em::qa_grad(kLsq, qp, s, u[k], g[k], term);
        ds += static_cast<double>(term);
      }
      return ds;
    }
    default:
      for (int64_t k = 0; k < n; ++k) gu[k] = g[k];
      return 0;
  }
}

ROW_KERNEL void scale_row(float* x, float f, int64_t n) {
  for (int64_t k = 0; k < n; ++k) x[k] = x[k] * f;
}

ROW_KERNEL void combine_row(int64_t combine, const float* a, const float* b, float* out, int64_t n) {
  if (combine == kAdd) {
    for (int64_t k = 0; k < n; ++k) out[k] = em::combine(kAdd, a[k], b[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = em::combine(kSub, a[k], b[k]);
  }
}

// The channels behind output channel co: LP channel (or -1) and FP channel (or -1).
inline void sources(const Cfg& c, int64_t co, int64_t& c1, int64_t& c2) {
  em::sources(c.fp, c.combine, c.c_lp, co, c1, c2);
}

struct Rows {  // scratch rows for one thread
  std::vector<float> buf;
  float *y1, *u, *y2, *v, *t, *g1, *g2;
  explicit Rows(int64_t hw) : buf(7 * hw) {
    float* p = buf.data();
    y1 = p; u = p + hw; y2 = p + 2 * hw; v = p + 3 * hw; t = p + 4 * hw; g1 = p + 5 * hw;
    g2 = p + 6 * hw;
  }
};

// Forward of one output row: writes out[0, hw).
void forward_row(const Cfg& c, const Norm& nm, int64_t c1, int64_t c2, const float* z1,
                 const float* z2, float* out, Rows& r) {
  const int64_t n = c.hw;
  if (c1 >= 0) {
    normalize(nm, c1, z1, r.y1, n);
    phi_row(c.phi, r.y1, r.u, n);
  }
  if (c2 >= 0) {
    normalize(nm, c2, z2, r.y2, n);
    phi_row(c.psi, r.y2, r.v, n);
    scale_row(r.v, c.f, n);
  }
  if (c2 < 0) {
    qa_row(c, r.u, out, n);
  } else if (c1 < 0) {  // a concat FP channel
    if (c.scheme == 2) std::copy(r.v, r.v + n, out); else qa_row(c, r.v, out, n);
  } else if (c.scheme == 2) {
    qa_row(c, r.u, r.t, n);
    combine_row(c.combine, r.t, r.v, out, n);
  } else {
    combine_row(c.combine, r.u, r.v, r.t, n);
    qa_row(c, r.t, out, n);
  }
}

// dy of one output row's LP channel (into d1) and FP channel (into d2); returns LSQ's sum.
double backward_row(const Cfg& c, const Norm& nm, int64_t c1, int64_t c2, const float* z1,
                    const float* z2, const float* g, Rows& r, float* d1, float* d2) {
  const int64_t n = c.hw;
  double ds = 0;
  if (c1 >= 0) {
    normalize(nm, c1, z1, r.y1, n);
    phi_row(c.phi, r.y1, r.u, n);
  }
  if (c2 >= 0) {
    normalize(nm, c2, z2, r.y2, n);
    if (c.scheme == 1) {  // Qa sees psi(y2) * f
      phi_row(c.psi, r.y2, r.v, n);
      scale_row(r.v, c.f, n);
    }
  }
  const float* gu = g;  // the gradient reaching u (LP) ...
  const float* gv = g;  // ... and psi(y2) before the factor f (FP)
  bool negate = false;
  if (c2 < 0) {
    ds = qa_grad_row(c, r.u, g, r.t, n);
    gu = r.t;
  } else if (c1 < 0) {
    if (c.scheme == 1) {
      ds = qa_grad_row(c, r.v, g, r.t, n);
      gv = r.t;
    }
  } else if (c.scheme == 2) {
    ds = qa_grad_row(c, r.u, g, r.t, n);
    gu = r.t;
    negate = c.combine == kSub;
  } else {
    combine_row(c.combine, r.u, r.v, r.g2, n);  // s, reusing g2 as scratch
    ds = qa_grad_row(c, r.g2, g, r.t, n);
    gu = gv = r.t;
    negate = c.combine == kSub;
  }
  if (c1 >= 0) phi_grad_row(c.phi, r.y1, gu, 1.f, false, d1, n);
  if (c2 >= 0) phi_grad_row(c.psi, r.y2, gv, negate ? -c.f : c.f, true, d2, n);
  return ds;
}


// ----------------------------------------------------------------------------- fast path
// Scheme 2 with add/sub and a_quant dorefa (k < 32), sign or none: one loop per row pair
// does everything, on explicit 8-float vectors (GCC vector extensions: ymm registers in the
// AVX2 clone, xmm pairs otherwise).  The masks of phi and Qa collapse into one test on y1:
// dorefa's clip then quantize keeps 0 <= y1 <= 1, sign keeps |y1| <= 1, none keeps y1 > 0
// after ReLU (or everything without an activation).

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

enum FastLp : int { kFastDorefa = 0, kFastSign = 1, kFastRelu = 2, kFastIdentity = 3 };

#define AI __attribute__((always_inline)) inline
AI v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
AI void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }
AI v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
AI v8f select(v8i m, v8f a, v8f b) { return m ? a : b; }
AI float hsum(v8f v) {
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

constexpr int kNoFp = 3;  // PSI value of the fast kernels when there is no FP branch

// Which (phi, a_quant) pair the fast path serves, or -1.
int fast_lp_kind(const Cfg& c) {
  if (c.fp && (c.scheme != 2 || c.combine == kConcat)) return -1;
  if (c.aq == kDorefa && c.bits != 32 && c.phi == kClip) return kFastDorefa;
  if (c.aq == kSign && c.phi == kIdentity) return kFastSign;
  if (c.aq == kNone && c.phi == kRelu) return kFastRelu;
  if (c.aq == kNone && c.phi == kIdentity) return kFastIdentity;
  return -1;
}

struct FastConsts {  // per channel pair: {mean, invstd, w, b} of each branch, +-f, levels
  v8f m1, i1, w1, b1, m2, i2, w2, b2, zero, one, vf, vl, magic;
};

AI void fast_consts(FastConsts& k, const float* p1, const float* p2, float fs, float lv) {
  k.m1 = splat(p1[0]); k.i1 = splat(p1[1]); k.w1 = splat(p1[2]); k.b1 = splat(p1[3]);
  k.m2 = splat(p2[0]); k.i2 = splat(p2[1]); k.w2 = splat(p2[2]); k.b2 = splat(p2[3]);
  k.zero = splat(0.f); k.one = splat(1.f); k.vf = splat(fs); k.vl = splat(lv);
  k.magic = splat(qm::kTwo23);
}

template <int LP, int PSI>
AI v8f fast_fwd_body(const FastConsts& k, v8f za, v8f zb) {
  v8f y1 = ((za - k.m1) * k.i1) * k.w1 + k.b1;
  v8f a;
  if (LP == kFastDorefa) {
    v8f c = select(y1 <= k.zero, k.zero, y1);
    c = select(c >= k.one, k.one, c);
    v8f x = c * k.vl;
    a = ((x + k.magic) - k.magic) / k.vl;  // x in [0, n]: adding 2^23 rounds half to even
  } else if (LP == kFastSign) {
    a = select(y1 > k.zero, k.one, k.zero) - select(y1 < k.zero, k.one, k.zero);
  } else if (LP == kFastRelu) {
    a = select((y1 > k.zero) | (y1 != y1), y1, k.zero);
  } else {
    a = y1;
  }
  if (PSI == kNoFp) return a;
  v8f y2 = ((zb - k.m2) * k.i2) * k.w2 + k.b2;
  v8f v;
  if (PSI == kRelu) {
    v = select((y2 > k.zero) | (y2 != y2), y2, k.zero);
  } else if (PSI == kClip) {
    v = select(y2 <= k.zero, k.zero, y2);
    v = select(v >= k.one, k.one, v);
  } else {
    v = y2;
  }
  return a + v * k.vf;  // a - f*v computed as a + v*(-f): the same rounding
}

template <int LP, int PSI>
AI void fast_fwd_impl(const float* z1, const float* z2, float* out, int64_t n, const float* p1,
                      const float* p2, float fs, float lv) {
  FastConsts k;
  fast_consts(k, p1, p2, fs, lv);
  int64_t j = 0;
  if (PSI == kNoFp) z2 = z1;
  for (; j + 8 <= n; j += 8) store8(out + j, fast_fwd_body<LP, PSI>(k, load8(z1 + j), load8(z2 + j)));
  if (j < n) {
    float ta[8] = {0}, tb[8] = {0}, to[8];
    for (int64_t t = j; t < n; ++t) { ta[t - j] = z1[t]; tb[t - j] = z2[t]; }
    store8(to, fast_fwd_body<LP, PSI>(k, load8(ta), load8(tb)));
    for (int64_t t = j; t < n; ++t) out[t] = to[t - j];
  }
}

struct FastSums {
  v8f s1, sx1, s2, sx2;
};

template <int LP, int PSI>
AI void fast_bwd_body(const FastConsts& k, v8f za, v8f zb, v8f gv, v8f& o1, v8f& o2, FastSums& s) {
  v8f x1 = (za - k.m1) * k.i1;
  v8f y1 = x1 * k.w1 + k.b1;
  v8i keep1;
  if (LP == kFastDorefa) keep1 = (y1 >= k.zero) & (y1 <= k.one);
  else if (LP == kFastSign) keep1 = (y1 <= k.one) & (y1 >= -k.one);
  else if (LP == kFastRelu) keep1 = y1 > k.zero;
  else keep1 = (y1 == y1) | (y1 != y1);
  o1 = select(keep1, gv, k.zero);
  s.s1 += o1;
  s.sx1 += o1 * x1;
  if (PSI == kNoFp) return;
  v8f x2 = (zb - k.m2) * k.i2;
  v8f y2 = x2 * k.w2 + k.b2;
  v8f gf = gv * k.vf;
  if (PSI == kRelu) o2 = select(y2 > k.zero, gf, k.zero);
  else if (PSI == kClip) o2 = select((y2 >= k.zero) & (y2 <= k.one), gf, k.zero);
  else o2 = gf;
  s.s2 += o2;
  s.sx2 += o2 * x2;
}

// FINAL = false: the sums of dy and dy * xhat only (pass 1).  FINAL = true: recompute dy
// and write dz = scale * (dy - a - xhat * b) with the coefficients in sums[0..5] (pass 2);
// recomputing costs less than storing dy and reading it back.
template <int LP, int PSI, bool FINAL>
AI void fast_bwd_impl(const float* z1, const float* z2, const float* g, float* d1, float* d2,
                      int64_t n, const float* p1, const float* p2, float fs, float* sums) {
  FastConsts k;
  fast_consts(k, p1, p2, fs, 1.f);
  FastSums s{k.zero, k.zero, k.zero, k.zero};
  v8f sc1 = k.zero, a1 = k.zero, bb1 = k.zero, sc2 = k.zero, a2 = k.zero, bb2 = k.zero;
  if (FINAL) {
    sc1 = splat(sums[0]); a1 = splat(sums[1]); bb1 = splat(sums[2]);
    sc2 = splat(sums[3]); a2 = splat(sums[4]); bb2 = splat(sums[5]);
  }
  if (PSI == kNoFp) z2 = z1;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    v8f o1, o2;
    v8f za = load8(z1 + j), zb = load8(z2 + j);
    fast_bwd_body<LP, PSI>(k, za, zb, load8(g + j), o1, o2, s);
    if (FINAL) {
      v8f x1 = (za - k.m1) * k.i1;
      store8(d1 + j, sc1 * (o1 - a1 - x1 * bb1));
      if (PSI != kNoFp) {
        v8f x2 = (zb - k.m2) * k.i2;
        store8(d2 + j, sc2 * (o2 - a2 - x2 * bb2));
      }
    }
  }
  if (j < n) {  // the tail, padded with g = 0 so the sums are unchanged
    float ta[8] = {0}, tb[8] = {0}, tg[8] = {0}, t1[8], t2[8];
    for (int64_t t = j; t < n; ++t) { ta[t - j] = z1[t]; tb[t - j] = z2[t]; tg[t - j] = g[t]; }
    v8f o1, o2;
    v8f za = load8(ta), zb = load8(tb);
    fast_bwd_body<LP, PSI>(k, za, zb, load8(tg), o1, o2, s);
    if (FINAL) {
      v8f x1 = (za - k.m1) * k.i1, x2 = (zb - k.m2) * k.i2;
      store8(t1, sc1 * (o1 - a1 - x1 * bb1));
      store8(t2, sc2 * (o2 - a2 - x2 * bb2));
      for (int64_t t = j; t < n; ++t) {
        d1[t] = t1[t - j];
        if (PSI != kNoFp) d2[t] = t2[t - j];
      }
    }
  }
  if (!FINAL) {
    sums[0] = hsum(s.s1);
    sums[1] = hsum(s.sx1);
    sums[2] = hsum(s.s2);
    sums[3] = hsum(s.sx2);
  }
}

#define FAST_DISPATCH_PSI(A, PSIK, CALL)                                              \
  switch (PSIK) {                                                                     \
    case 0: CALL(A, 0); break; case 1: CALL(A, 1); break; case 2: CALL(A, 2); break;   \
    default: CALL(A, 3); break;                                                       \
  }
#define FAST_DISPATCH(LPK, PSIK, CALL)                   \
  switch (LPK) {                                         \
    case 0: FAST_DISPATCH_PSI(0, PSIK, CALL) break;      \
    case 1: FAST_DISPATCH_PSI(1, PSIK, CALL) break;      \
    case 2: FAST_DISPATCH_PSI(2, PSIK, CALL) break;      \
    default: FAST_DISPATCH_PSI(3, PSIK, CALL) break;     \
  }

ROW_KERNEL void fast_fwd_row(int lp, int64_t psi, const float* z1, const float* z2, float* out,
                             int64_t n, const float* p1, const float* p2, float fs, float lv) {
#define CALL(A, B) fast_fwd_impl<A, B>(z1, z2, out, n, p1, p2, fs, lv)
  FAST_DISPATCH(lp, psi, CALL)
#undef CALL
}

ROW_KERNEL void fast_bwd_row(int lp, int64_t psi, const float* z1, const float* z2,
                             const float* g, float* d1, float* d2, int64_t n, const float* p1,
                             const float* p2, float fs, float* sums) {
#define CALL(A, B) fast_bwd_impl<A, B, false>(z1, z2, g, d1, d2, n, p1, p2, fs, sums)
  FAST_DISPATCH(lp, psi, CALL)
#undef CALL
}

ROW_KERNEL void fast_dz_row(int lp, int64_t psi, const float* z1, const float* z2,
                            const float* g, float* d1, float* d2, int64_t n, const float* p1,
                            const float* p2, float fs, float* coef) {
#define CALL(A, B) fast_bwd_impl<A, B, true>(z1, z2, g, d1, d2, n, p1, p2, fs, coef)
  FAST_DISPATCH(lp, psi, CALL)
#undef CALL
}

inline void channel_params(const Norm& nm, int64_t ch, float* p) {
  p[0] = nm.mean[ch];
  p[1] = nm.invstd[ch];
  p[2] = nm.w[ch];
  p[3] = nm.b[ch];
}

// ----------------------------------------------------------------------------- channels_last
// z as a (pixels, C) matrix: the channels of one pixel are adjacent, so the fast kernels run
// on 8 channels at a time with per-lane parameters instead of one channel's splats.  Pixels
// go in fixed blocks of kPixBlock: per-block float sums, added in block order in double, so
// the result does not depend on the thread count.

constexpr int64_t kPixBlock = 256;
constexpr int64_t kImgBlock = 4;  // NCHW: images per block of the statistics passes

// NCHW statistics passes: fn(i, acc) adds image i's terms into `width` doubles; images go in
// fixed blocks of kImgBlock, each block's sums in memory order, and the blocks' sums are added
// in block order, so the result does not depend on the thread count.
template <typename Fn>
std::vector<double> image_block_sums(int64_t n, int64_t width, Fn fn) {
  const int64_t nb = (n + kImgBlock - 1) / kImgBlock;
  std::vector<double> part(nb * width, 0.0);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bl = b0; bl < b1; ++bl)
      for (int64_t i = bl * kImgBlock; i < std::min(n, (bl + 1) * kImgBlock); ++i)
        fn(i, &part[bl * width]);
  });
  std::vector<double> total(width, 0.0);
  for (int64_t bl = 0; bl < nb; ++bl)
    for (int64_t j = 0; j < width; ++j) total[j] += part[bl * width + j];
  return total;
}

bool channels_last(const Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

struct ClParams {  // per channel, padded to a multiple of 8 (padding: mean 0, invstd 0, ...)
  std::vector<float> m, i, w, b, sc, a, bb;
  int64_t padded;
  ClParams(const Norm& nm, int64_t ch) : padded((ch + 7) / 8 * 8 + 8) {
    for (auto* v : {&m, &i, &w, &b, &sc, &a, &bb}) v->assign(padded, 0.f);
    std::copy(nm.mean.begin(), nm.mean.end(), m.begin());
    std::copy(nm.invstd.begin(), nm.invstd.end(), i.begin());
    std::copy(nm.w.begin(), nm.w.end(), w.begin());
    std::copy(nm.b.begin(), nm.b.end(), b.begin());
  }
};

AI void cl_consts(FastConsts& k, const ClParams& p, int64_t c1, int64_t c2, float fs, float lv) {
  k.m1 = load8(&p.m[c1]); k.i1 = load8(&p.i[c1]); k.w1 = load8(&p.w[c1]); k.b1 = load8(&p.b[c1]);
  k.m2 = load8(&p.m[c2]); k.i2 = load8(&p.i[c2]); k.w2 = load8(&p.w[c2]); k.b2 = load8(&p.b[c2]);
  k.zero = splat(0.f); k.one = splat(1.f); k.vf = splat(fs); k.vl = splat(lv);
  k.magic = splat(qm::kTwo23);
}

// z's row of pixel q, 8 channels from ch (zero padded past `valid`)
AI v8f cl_load(const float* row, int64_t ch, int64_t valid) {
  if (valid >= 8) return load8(row + ch);
  float t[8] = {0};
  for (int64_t j = 0; j < valid; ++j) t[j] = row[ch + j];
  return load8(t);
}

AI void cl_store(float* row, int64_t ch, int64_t valid, v8f v) {
  if (valid >= 8) { store8(row + ch, v); return; }
  float t[8];
  store8(t, v);
  for (int64_t j = 0; j < valid; ++j) row[ch + j] = t[j];
}

// Per block of pixels [q0, q1): the float sums of d = z - k and d^2 per channel into s, ss.
ROW_KERNEL void cl_moments(const float* z, int64_t C, int64_t q0, int64_t q1, const float* k,
                           float* s, float* ss) {
  for (int64_t ch = 0; ch < C; ++ch) { s[ch] = 0.f; ss[ch] = 0.f; }
  for (int64_t q = q0; q < q1; ++q) {
    const float* r = z + q * C;
    for (int64_t ch = 0; ch < C; ++ch) {
      float d = r[ch] - k[ch];
      s[ch] += d;
      ss[ch] += d * d;
    }
  }
}

// Mean and biased variance per channel of a channels_last z (the NCHW pass's method: sums
// about a shift k, the first block's mean, to keep E[d^2] - E[d]^2's cancellation small).
void cl_stats(const float* z, int64_t P, int64_t C, float* mp, float* vp) {
  const int64_t nb = (P + kPixBlock - 1) / kPixBlock;
  std::vector<float> k(C, 0.f), part(2 * nb * C);
  std::vector<float> tmp(C);
  cl_moments(z, C, 0, std::min(P, kPixBlock), k.data(), tmp.data(), part.data());
  const float first = static_cast<float>(std::min(P, kPixBlock));
  for (int64_t ch = 0; ch < C; ++ch) k[ch] = tmp[ch] / first;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bl = b0; bl < b1; ++bl)
      cl_moments(z, C, bl * kPixBlock, std::min(P, (bl + 1) * kPixBlock), k.data(),
                 &part[bl * C], &part[(nb + bl) * C]);
  });
  for (int64_t ch = 0; ch < C; ++ch) {
    double s = 0, ss = 0;
    for (int64_t bl = 0; bl < nb; ++bl) {
      s += part[bl * C + ch];
      ss += part[(nb + bl) * C + ch];
    }
    const double dmean = s / static_cast<double>(P);
    mp[ch] = static_cast<float>(static_cast<double>(k[ch]) + dmean);
    vp[ch] = static_cast<float>(std::max(ss / static_cast<double>(P) - dmean * dmean, 0.0));
  }
}

template <int LP, int PSI>
AI void cl_fwd_impl(const float* z, float* out, int64_t C, int64_t c_lp, int64_t c_out,
                    int64_t q0, int64_t q1, const ClParams& p, float fs, float lv) {
  for (int64_t co = 0; co < c_out; co += 8) {
    const int64_t valid = std::min<int64_t>(8, c_out - co);
    FastConsts k;
    cl_consts(k, p, co, PSI == kNoFp ? co : c_lp + co, fs, lv);
    for (int64_t q = q0; q < q1; ++q) {
      const float* r = z + q * C;
      v8f za = cl_load(r, co, valid);
      v8f zb = PSI == kNoFp ? za : cl_load(r, c_lp + co, valid);
      cl_store(out + q * c_out, co, valid, fast_fwd_body<LP, PSI>(k, za, zb));
    }
  }
}

// FINAL = false: per-channel float sums of dy and dy * xhat over the block into
// sums[0..4) x C (LP channel co: sums[0][co], sums[1][co]; its FP channel: sums[2][co],
// sums[3][co]).  FINAL = true: dz = sc * (dy - a - xhat * bb) with ClParams' coefficients.
template <int LP, int PSI, bool FINAL>
AI void cl_bwd_impl(const float* z, const float* g, float* dz, int64_t C, int64_t c_lp,
                    int64_t c_out, int64_t q0, int64_t q1, const ClParams& p, float fs,
                    float* sums) {
  for (int64_t co = 0; co < c_out; co += 8) {
    const int64_t valid = std::min<int64_t>(8, c_out - co);
    const int64_t c2 = PSI == kNoFp ? co : c_lp + co;
    FastConsts k;
    cl_consts(k, p, co, c2, fs, 1.f);
    FastSums s{k.zero, k.zero, k.zero, k.zero};
    v8f sc1 = load8(&p.sc[co]), a1 = load8(&p.a[co]), bb1 = load8(&p.bb[co]);
    v8f sc2 = load8(&p.sc[c2]), a2 = load8(&p.a[c2]), bb2 = load8(&p.bb[c2]);
    for (int64_t q = q0; q < q1; ++q) {
      const float* r = z + q * C;
      v8f za = cl_load(r, co, valid);
      v8f zb = PSI == kNoFp ? za : cl_load(r, c2, valid);
      v8f o1, o2;
      fast_bwd_body<LP, PSI>(k, za, zb, cl_load(g + q * c_out, co, valid), o1, o2, s);
      if (FINAL) {
        cl_store(dz + q * C, co, valid, sc1 * (o1 - a1 - ((za - k.m1) * k.i1) * bb1));
        if (PSI != kNoFp) cl_store(dz + q * C, c2, valid, sc2 * (o2 - a2 - ((zb - k.m2) * k.i2) * bb2));
      }
    }
    if (!FINAL) {
      v8f* acc[4] = {&s.s1, &s.sx1, &s.s2, &s.sx2};
      for (int j = 0; j < 4; ++j) {
        float t[8];
        store8(t, *acc[j]);
        for (int64_t l = 0; l < valid; ++l) sums[j * c_out + co + l] = t[l];
      }
    }
  }
}

ROW_KERNEL void cl_fwd_block(int lp, int64_t psi, const float* z, float* out, int64_t C,
                             int64_t c_lp, int64_t c_out, int64_t q0, int64_t q1,
                             const ClParams& p, float fs, float lv) {
#define CALL(A, B) cl_fwd_impl<A, B>(z, out, C, c_lp, c_out, q0, q1, p, fs, lv)
  FAST_DISPATCH(lp, psi, CALL)
#undef CALL
}

ROW_KERNEL void cl_bwd_block(int lp, int64_t psi, bool final_pass, const float* z,
                             const float* g, float* dz, int64_t C, int64_t c_lp, int64_t c_out,
                             int64_t q0, int64_t q1, const ClParams& p, float fs, float* sums) {
#define CALL(A, B)                                                              \
  if (final_pass) cl_bwd_impl<A, B, true>(z, g, dz, C, c_lp, c_out, q0, q1, p, fs, sums); \
  else cl_bwd_impl<A, B, false>(z, g, dz, C, c_lp, c_out, q0, q1, p, fs, sums);
  FAST_DISPATCH(lp, psi, CALL)
#undef CALL
}

// The batch statistics of z: mean and biased variance per channel, float32.
void batch_stats(const Tensor& z, const Cfg& c, bool cl, Tensor& mean, Tensor& var) {
  const float* zp = z.const_data_ptr<float>();
  mean = at::empty({c.c_tot}, z.options());
  var = at::empty({c.c_tot}, z.options());
  float* mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  if (cl) {
    cl_stats(zp, c.n * c.hw, c.c_tot, mp, vp);
    return;
  }
  const double count = static_cast<double>(c.n * c.hw);
  // statistics in one pass: sums of (z - k) and (z - k)^2 about the first image's per-channel
  // mean k, which keeps the cancellation of var = E[d^2] - E[d]^2 small; float lanes per row,
  // double across rows.  Images go in fixed blocks, read in memory order.
  std::vector<float> k(c.c_tot);
  for (int64_t ch = 0; ch < c.c_tot; ++ch)
    k[ch] = row_sum(zp + ch * c.hw, c.hw) / static_cast<float>(c.hw);
  std::vector<double> sums = image_block_sums(c.n, 2 * c.c_tot, [&](int64_t i, double* acc) {
    for (int64_t ch = 0; ch < c.c_tot; ++ch) {
      float a, b;
      row_moments(zp + (i * c.c_tot + ch) * c.hw, k[ch], c.hw, a, b);
      acc[ch] += a;
      acc[c.c_tot + ch] += b;
    }
  });
  for (int64_t ch = 0; ch < c.c_tot; ++ch) {
    const double dmean = sums[ch] / count;
    mp[ch] = static_cast<float>(static_cast<double>(k[ch]) + dmean);
    vp[ch] = static_cast<float>(std::max(sums[c.c_tot + ch] / count - dmean * dmean, 0.0));
  }
}

// The forward's second pass, from the statistics it is given: normalise, phi, Qa, psi, f and
// the combine.
Tensor forward_pass(const Tensor& z, const Cfg& c, int fast, bool cl, const Tensor& weight,
                    const Tensor& bias, const Tensor& mean, const Tensor& var, double eps) {
  const float* zp = z.const_data_ptr<float>();
  const float fs = c.combine == kSub ? -c.f : c.f;
  if (cl) {
    ClParams p(make_norm(weight, bias, mean, var, eps), c.c_tot);
    Tensor out = at::empty({c.n, c.c_out, z.size(2), z.size(3)},
                           z.options().memory_format(at::MemoryFormat::ChannelsLast));
    float* op = out.data_ptr<float>();
    const int64_t P = c.n * c.hw, nb = (P + kPixBlock - 1) / kPixBlock;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bl = b0; bl < b1; ++bl)
        cl_fwd_block(fast, c.fp ? c.psi : kNoFp, zp, op, c.c_tot, c.c_lp, c.c_out, bl * kPixBlock,
                     std::min(P, (bl + 1) * kPixBlock), p, fs, c.levels);
    });
    return out;
  }
  Norm nm = make_norm(weight, bias, mean, var, eps);
  Tensor out = at::empty({c.n, c.c_out, z.size(2), z.size(3)}, z.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, c.n * c.c_out, 1, [&](int64_t r0, int64_t r1) {
    if (fast >= 0) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t i = r / c.c_out, co = r % c.c_out, c1, c2;
        sources(c, co, c1, c2);
        float p1[4], p2[4] = {0.f, 0.f, 0.f, 0.f};
        channel_params(nm, c1, p1);
        if (c2 >= 0) channel_params(nm, c2, p2);
        const float* z1 = zp + (i * c.c_tot + c1) * c.hw;
        const float* z2 = c2 >= 0 ? zp + (i * c.c_tot + c2) * c.hw : z1;
        fast_fwd_row(fast, c2 >= 0 ? c.psi : kNoFp, z1, z2, op + r * c.hw, c.hw, p1, p2, fs,
                     c.levels);
      }
      return;
    }
    Rows rows(c.hw);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t i = r / c.c_out, co = r % c.c_out, c1, c2;
      sources(c, co, c1, c2);
      const float* z1 = c1 >= 0 ? zp + (i * c.c_tot + c1) * c.hw : nullptr;
      const float* z2 = c2 >= 0 ? zp + (i * c.c_tot + c2) * c.hw : nullptr;
      forward_row(c, nm, c1, c2, z1, z2, op + r * c.hw, rows);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> block_epilogue_fwd(
    const Tensor& z, const Tensor& weight, const Tensor& bias, const Tensor& f,
    const c10::optional<Tensor>& step, int64_t c_lp, double eps, int64_t scheme, int64_t combine,
    int64_t a_quant, int64_t a_bits, int64_t phi, int64_t psi) {
  Cfg c = make_cfg(z, f, step, c_lp, scheme, combine, a_quant, a_bits, phi, psi);
  const int fast = fast_lp_kind(c);
  const bool cl = channels_last(z);
  if (cl && fast < 0) {  // the general row kernels walk NCHW rows
    auto r = block_epilogue_fwd(z.contiguous(), weight, bias, f, step, c_lp, eps, scheme, combine,
                                a_quant, a_bits, phi, psi);
    return {std::get<0>(r).contiguous(at::MemoryFormat::ChannelsLast), std::get<1>(r),
            std::get<2>(r)};
  }
  Tensor mean, var;
  batch_stats(z, c, cl, mean, var);
  return {forward_pass(z, c, fast, cl, weight, bias, mean, var, eps), mean, var};
}

// z's local statistics, for a caller that reduces them across ranks (see expcuda/nn/synced_epilogue.py)
std::tuple<Tensor, Tensor> block_epilogue_stats(const Tensor& z) {
  TORCH_CHECK(z.numel() > 0 && z.dim() == 4 && z.scalar_type() == at::kFloat &&
                  (z.is_contiguous() || z.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "block_epilogue_stats: z must be a non-empty float32 (N, C, H, W) tensor, "
              "contiguous or channels_last");
  Cfg c;
  c.n = z.size(0);
  c.c_tot = z.size(1);
  c.hw = z.size(2) * z.size(3);
  Tensor mean, var;
  batch_stats(z, c, channels_last(z), mean, var);
  return {mean, var};
}

// The forward's second pass alone, with statistics from elsewhere (reduced across ranks).
Tensor block_epilogue_fwd_given(
    const Tensor& z, const Tensor& weight, const Tensor& bias, const Tensor& f,
    const c10::optional<Tensor>& step, const Tensor& mean, const Tensor& var, int64_t c_lp,
    double eps, int64_t scheme, int64_t combine, int64_t a_quant, int64_t a_bits, int64_t phi,
    int64_t psi) {
  Cfg c = make_cfg(z, f, step, c_lp, scheme, combine, a_quant, a_bits, phi, psi);
  check_stats(mean, var, c);
  const int fast = fast_lp_kind(c);
  const bool cl = channels_last(z);
  if (cl && fast < 0)  // the general row kernels walk NCHW rows
    return forward_pass(z.contiguous(), c, fast, false, weight, bias, mean, var, eps)
        .contiguous(at::MemoryFormat::ChannelsLast);
  return forward_pass(z, c, fast, cl, weight, bias, mean, var, eps);
}

// What the backward computes: everything (kFull); pass 1 alone, the per-channel sums of dy and
// dy * xhat (kSumsOnly); pass 2 alone, dz from the sums it is given (kDzGiven: reduced across
// ranks; the general NCHW rows still run pass 1, which writes dy into dz for pass 2).
enum BwdMode : int { kFull = 0, kSumsOnly = 1, kDzGiven = 2 };

struct BwdOut {
  Tensor dz;  // undefined with kSumsOnly
  std::vector<double> sum_g, sum_gx;
  Tensor dstep;
};

struct GivenSums {  // kDzGiven: sums of dy and dy * xhat per channel over `count` values
  const double* sum_g;
  const double* sum_gx;
  double count;
};

BwdOut bwd_core(
    const Tensor& grad, const Tensor& z, const Tensor& weight, const Tensor& bias, const Tensor& f,
    const c10::optional<Tensor>& step, const Tensor& mean, const Tensor& var, int64_t c_lp,
    double eps, int64_t scheme, int64_t combine, int64_t a_quant, int64_t a_bits, int64_t phi,
    int64_t psi, BwdMode mode, const GivenSums& given) {
  Cfg c = make_cfg(z, f, step, c_lp, scheme, combine, a_quant, a_bits, phi, psi);
  const int fast = fast_lp_kind(c);
  const bool cl = channels_last(z);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(grad.is_contiguous(fmt) && grad.scalar_type() == at::kFloat && grad.dim() == 4 &&
                  grad.size(0) == c.n && grad.size(1) == c.c_out && grad.size(2) == z.size(2) &&
                  grad.size(3) == z.size(3),
              "block_epilogue_bwd: grad must be float32, shaped like the output and laid out like z");
  if (cl && fast < 0) {  // the general row kernels walk NCHW rows
    BwdOut r = bwd_core(grad.contiguous(), z.contiguous(), weight, bias, f, step, mean, var, c_lp,
                        eps, scheme, combine, a_quant, a_bits, phi, psi, mode, given);
    if (r.dz.defined()) r.dz = r.dz.contiguous(at::MemoryFormat::ChannelsLast);
    return r;
  }
  Norm nm = make_norm(weight, bias, mean, var, eps);
  const float* zp = z.const_data_ptr<float>();
  const float* gp = grad.const_data_ptr<float>();
  const int64_t hw = c.hw;
  const int64_t P = c.n * hw, nb = (P + kPixBlock - 1) / kPixBlock;
  std::vector<double> sum_g(c.c_tot, 0.0), sum_gx(c.c_tot, 0.0), ds_part(c.c_out, 0.0);
  std::optional<ClParams> clp;
  if (cl) clp.emplace(nm, c.c_tot);
  // sum over a row of g and of g * xhat
  auto row_sums = [&](const Norm& nm, int64_t ch, const float* zr, const float* gr, double& s,
                      double& sx) {
    float a, b;
    row_sums_bwd(zr, gr, nm.mean[ch], nm.invstd[ch], hw, a, b);
    s += a;
    sx += b;
  };
  // pass 1: per output channel (its LP and FP channels belong to it alone, so no races):
  // dy into dz, and the per-channel sums of dy and dy * xhat
  Tensor dz = at::empty_like(z, fmt);
  float* dp = dz.data_ptr<float>();
  const float fs = c.combine == kSub ? -c.f : c.f;
  const int64_t psi_cl = c.fp ? c.psi : kNoFp;
  if (mode == kDzGiven && (cl || fast >= 0)) {
    // pass 1 of these kernels only sums: the given sums replace it
  } else if (cl) {  // per pixel block: float sums per channel, then double across blocks in order
    std::vector<float> part(nb * 4 * c.c_out);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bl = b0; bl < b1; ++bl)
        cl_bwd_block(fast, psi_cl, false, zp, gp, nullptr, c.c_tot, c.c_lp, c.c_out,
                     bl * kPixBlock, std::min(P, (bl + 1) * kPixBlock), *clp, fs,
                     &part[bl * 4 * c.c_out]);
    });
    for (int64_t co = 0; co < c.c_out; ++co) {
      double acc[4] = {0, 0, 0, 0};
      for (int64_t bl = 0; bl < nb; ++bl)
        for (int j = 0; j < 4; ++j) acc[j] += part[(bl * 4 + j) * c.c_out + co];
      sum_g[co] = acc[0];
      sum_gx[co] = acc[1];
      if (c.fp) { sum_g[c.c_lp + co] = acc[2]; sum_gx[c.c_lp + co] = acc[3]; }
    }
  } else if (fast >= 0) {  // image blocks in memory order: the sums of dy and dy * xhat
    std::vector<double> acc = image_block_sums(c.n, 4 * c.c_out, [&](int64_t i, double* part) {
      for (int64_t co = 0; co < c.c_out; ++co) {
        int64_t c1, c2;
        sources(c, co, c1, c2);
        float p1[4], p2[4] = {0.f, 0.f, 0.f, 0.f}, sums[4];
        channel_params(nm, c1, p1);
        if (c2 >= 0) channel_params(nm, c2, p2);
        const int64_t o1r = (i * c.c_tot + c1) * hw;
        const int64_t o2r = c2 >= 0 ? (i * c.c_tot + c2) * hw : o1r;
        fast_bwd_row(fast, c2 >= 0 ? c.psi : kNoFp, zp + o1r, zp + o2r,
                     gp + (i * c.c_out + co) * hw, dp + o1r, dp + o2r, hw, p1, p2, fs, sums);
        for (int j = 0; j < 4; ++j) part[j * c.c_out + co] += sums[j];
      }
    });
    for (int64_t co = 0; co < c.c_out; ++co) {
      int64_t c1, c2;
      sources(c, co, c1, c2);
      sum_g[c1] = acc[co];
      sum_gx[c1] = acc[c.c_out + co];
      if (c2 >= 0) { sum_g[c2] = acc[2 * c.c_out + co]; sum_gx[c2] = acc[3 * c.c_out + co]; }
    }
  } else {  // the general rows, in image blocks too: dy into dz, sums per channel, LSQ's sum
    // acc: [sum dy | sum dy * xhat] per channel, then ds per output channel
    std::vector<double> acc = image_block_sums(c.n, 2 * c.c_tot + c.c_out, [&](int64_t i, double* part) {
      Rows rows(hw);
      for (int64_t co = 0; co < c.c_out; ++co) {
        int64_t c1, c2;
        sources(c, co, c1, c2);
        const float* z1 = c1 >= 0 ? zp + (i * c.c_tot + c1) * hw : nullptr;
        const float* z2 = c2 >= 0 ? zp + (i * c.c_tot + c2) * hw : nullptr;
        float* d1 = c1 >= 0 ? dp + (i * c.c_tot + c1) * hw : nullptr;
        float* d2 = c2 >= 0 ? dp + (i * c.c_tot + c2) * hw : nullptr;
        part[2 * c.c_tot + co] +=
            backward_row(c, nm, c1, c2, z1, z2, gp + (i * c.c_out + co) * hw, rows, d1, d2);
        if (z1) row_sums(nm, c1, z1, d1, part[c1], part[c.c_tot + c1]);
        if (z2) row_sums(nm, c2, z2, d2, part[c2], part[c.c_tot + c2]);
      }
    });
    std::copy(acc.begin(), acc.begin() + c.c_tot, sum_g.begin());
    std::copy(acc.begin() + c.c_tot, acc.begin() + 2 * c.c_tot, sum_gx.begin());
    std::copy(acc.begin() + 2 * c.c_tot, acc.end(), ds_part.begin());
  }
  double ds = 0;
  for (double p : ds_part) ds += p;
  int64_t numel = c.n * hw * ((c.scheme == 1 && c.fp) ? c.c_out : c.c_lp);
  Tensor dstep = at::full({}, c.aq == kLsq ? qm::lsq_step_grad(ds, numel, c.qp) : 0.f, z.options());
  if (mode == kSumsOnly) return {Tensor(), sum_g, sum_gx, dstep};
  double count = static_cast<double>(c.n * hw);
  if (mode == kDzGiven) {
    std::copy(given.sum_g, given.sum_g + c.c_tot, sum_g.begin());
    std::copy(given.sum_gx, given.sum_gx + c.c_tot, sum_gx.begin());
    count = given.count;
  }
  std::vector<float> scale(c.c_tot), a(c.c_tot), bcoef(c.c_tot);
  for (int64_t ch = 0; ch < c.c_tot; ++ch) {
    scale[ch] = nm.w[ch] * nm.invstd[ch];
    a[ch] = static_cast<float>(static_cast<float>(sum_g[ch]) / count);
    bcoef[ch] = static_cast<float>(static_cast<float>(sum_gx[ch]) / count);
  }
  if (cl) {  // pass 2: recompute dy and write dz
    for (int64_t ch = 0; ch < c.c_tot; ++ch) {
      clp->sc[ch] = scale[ch];
      clp->a[ch] = a[ch];
      clp->bb[ch] = bcoef[ch];
    }
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bl = b0; bl < b1; ++bl)
        cl_bwd_block(fast, psi_cl, true, zp, gp, dp, c.c_tot, c.c_lp, c.c_out, bl * kPixBlock,
                     std::min(P, (bl + 1) * kPixBlock), *clp, fs, nullptr);
    });
  } else if (fast >= 0) {  // pass 2: recompute dy and write dz
    at::parallel_for(0, c.n * c.c_out, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t i = r / c.c_out, co = r % c.c_out, c1, c2;
        sources(c, co, c1, c2);
        float p1[4], p2[4] = {0.f, 0.f, 0.f, 0.f};
        channel_params(nm, c1, p1);
        float coef[6] = {scale[c1], a[c1], bcoef[c1], 0.f, 0.f, 0.f};
        if (c2 >= 0) {
          channel_params(nm, c2, p2);
          coef[3] = scale[c2];
          coef[4] = a[c2];
          coef[5] = bcoef[c2];
        }
        const int64_t o1r = (i * c.c_tot + c1) * hw;
        const int64_t o2r = c2 >= 0 ? (i * c.c_tot + c2) * hw : o1r;
        fast_dz_row(fast, c2 >= 0 ? c.psi : kNoFp, zp + o1r, zp + o2r, gp + r * hw, dp + o1r,
                    dp + o2r, hw, p1, p2, fs, coef);
      }
    });
  } else {
  // pass 2, in place: dz = scale * (dy - mean(dy) - xhat * mean(dy * xhat))
  at::parallel_for(0, c.n * c.c_tot, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ch = r % c.c_tot;
      row_dz(zp + r * hw, dp + r * hw, nm.mean[ch], nm.invstd[ch], scale[ch], a[ch], bcoef[ch],
             dp + r * hw, hw);
    }
  });
  }
  return {dz, sum_g, sum_gx, dstep};
}

Tensor sums_tensor(const std::vector<double>& v, const Tensor& like, at::ScalarType dtype) {
  Tensor t = at::empty({static_cast<int64_t>(v.size())}, like.options().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t.to(dtype);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> block_epilogue_bwd(
    const Tensor& grad, const Tensor& z, const Tensor& weight, const Tensor& bias, const Tensor& f,
    const c10::optional<Tensor>& step, const Tensor& mean, const Tensor& var, int64_t c_lp,
    double eps, int64_t scheme, int64_t combine, int64_t a_quant, int64_t a_bits, int64_t phi,
    int64_t psi) {
  BwdOut r = bwd_core(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine,
                      a_quant, a_bits, phi, psi, kFull, GivenSums{nullptr, nullptr, 0.0});
  // the float32 rounding of the sums, then the parameters' dtype
  Tensor dweight = sums_tensor(r.sum_gx, z, at::kFloat).to(weight.scalar_type());
  Tensor dbias = sums_tensor(r.sum_g, z, at::kFloat).to(bias.scalar_type());
  return {r.dz, dweight, dbias, r.dstep};
}

// Pass 1 alone: this rank's float64 sums of dy and dy * xhat per channel (BatchNorm's weight
// and bias gradients, before rounding), and LSQ's step gradient.
std::tuple<Tensor, Tensor, Tensor> block_epilogue_bwd_sums(
    const Tensor& grad, const Tensor& z, const Tensor& weight, const Tensor& bias, const Tensor& f,
    const c10::optional<Tensor>& step, const Tensor& mean, const Tensor& var, int64_t c_lp,
    double eps, int64_t scheme, int64_t combine, int64_t a_quant, int64_t a_bits, int64_t phi,
    int64_t psi) {
  BwdOut r = bwd_core(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine,
                      a_quant, a_bits, phi, psi, kSumsOnly, GivenSums{nullptr, nullptr, 0.0});
  return {sums_tensor(r.sum_g, z, at::kDouble), sums_tensor(r.sum_gx, z, at::kDouble), r.dstep};
}

// Pass 2 alone: dz from the sums of dy and dy * xhat over `count` values of every rank.
Tensor block_epilogue_bwd_given(
    const Tensor& grad, const Tensor& z, const Tensor& weight, const Tensor& bias, const Tensor& f,
    const c10::optional<Tensor>& step, const Tensor& mean, const Tensor& var, const Tensor& sum_g,
    const Tensor& sum_gx, double count, int64_t c_lp, double eps, int64_t scheme,
    int64_t combine, int64_t a_quant, int64_t a_bits, int64_t phi, int64_t psi) {
  TORCH_CHECK(sum_g.scalar_type() == at::kDouble && sum_gx.scalar_type() == at::kDouble &&
                  sum_g.is_contiguous() && sum_gx.is_contiguous() && sum_g.numel() == z.size(1) &&
                  sum_gx.numel() == z.size(1) && count > 0,
              "block_epilogue_bwd_given: sum_g and sum_gx must be contiguous float64 tensors of C "
              "elements and count > 0");
  return bwd_core(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant,
                  a_bits, phi, psi, kDzGiven,
                  GivenSums{sum_g.const_data_ptr<double>(), sum_gx.const_data_ptr<double>(), count})
      .dz;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expcuda_C, m) {
  // codes: combine 0 add, 1 sub, 2 concat; a_quant 0 none, 1 dorefa, 2 sign, 3 lsq;
  // phi/psi 0 identity, 1 relu, 2 clip
  m.def("block_epilogue_fwd(Tensor z, Tensor weight, Tensor bias, Tensor f, Tensor? step, int c_lp,"
        " float eps, int scheme, int combine, int a_quant, int a_bits, int phi, int psi)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("block_epilogue_bwd(Tensor grad, Tensor z, Tensor weight, Tensor bias, Tensor f,"
        " Tensor? step, Tensor mean, Tensor var, int c_lp, float eps, int scheme, int combine,"
        " int a_quant, int a_bits, int phi, int psi) -> (Tensor, Tensor, Tensor, Tensor)");
  // the same split in its passes, for statistics reduced across DDP ranks in between
  // (expcuda/nn/synced_epilogue.py); CPU only: synced CUDA blocks use the PyTorch kernels
  m.def("block_epilogue_stats(Tensor z) -> (Tensor, Tensor)");
  m.def("block_epilogue_fwd_given(Tensor z, Tensor weight, Tensor bias, Tensor f, Tensor? step,"
        " Tensor mean, Tensor var, int c_lp, float eps, int scheme, int combine, int a_quant,"
        " int a_bits, int phi, int psi) -> Tensor");
  m.def("block_epilogue_bwd_sums(Tensor grad, Tensor z, Tensor weight, Tensor bias, Tensor f,"
        " Tensor? step, Tensor mean, Tensor var, int c_lp, float eps, int scheme, int combine,"
        " int a_quant, int a_bits, int phi, int psi) -> (Tensor, Tensor, Tensor)");
  m.def("block_epilogue_bwd_given(Tensor grad, Tensor z, Tensor weight, Tensor bias, Tensor f,"
        " Tensor? step, Tensor mean, Tensor var, Tensor sum_g, Tensor sum_gx, float count, int c_lp,"
        " float eps, int scheme, int combine, int a_quant, int a_bits, int phi, int psi) -> Tensor");
}

TORCH_LIBRARY_IMPL(expcuda_C, CPU, m) {
  m.impl("block_epilogue_fwd", &block_epilogue_fwd);
  m.impl("block_epilogue_bwd", &block_epilogue_bwd);
  m.impl("block_epilogue_stats", &block_epilogue_stats);
  m.impl("block_epilogue_fwd_given", &block_epilogue_fwd_given);
  m.impl("block_epilogue_bwd_sums", &block_epilogue_bwd_sums);
  m.impl("block_epilogue_bwd_given", &block_epilogue_bwd_given);
}

}  // namespace expcuda
