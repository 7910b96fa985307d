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

#include <cmath>
#include <vector>

#include "common/quant_math.h"

namespace expcuda {
namespace {

using at::Tensor;

enum Combine : int64_t { kAdd = 0, kSub = 1, kConcat = 2 };
enum AQuant : int64_t { kNone = 0, kDorefa = 1, kSign = 2, kLsq = 3 };
enum Phi : int64_t { kIdentity = 0, kRelu = 1, kClip = 2 };

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
  TORCH_CHECK(z.dim() == 4 && z.scalar_type() == at::kFloat && z.is_contiguous(),
              "block_epilogue: z must be a contiguous float32 (N, C, H, W) tensor");
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

ROW_KERNEL float row_sumsq(const float* x, float m, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      float d = x[k + j] - m;
      acc[j] += d * d;
    }
  float s = 0.f;
  for (; k < n; ++k) {
    float d = x[k] - m;
    s += d * d;
  }
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
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
  for (int64_t k = 0; k < n; ++k) y[k] = ((z[k] - m) * is) * w + b;
}

ROW_KERNEL void phi_row(int64_t kind, const float* y, float* u, int64_t n) {
  if (kind == kRelu) {
    for (int64_t k = 0; k < n; ++k) u[k] = (y[k] > 0.f || y[k] != y[k]) ? y[k] : 0.f;
  } else if (kind == kClip) {
    for (int64_t k = 0; k < n; ++k) u[k] = qm::clamp(y[k], 0.f, 1.f);
  } else {
    for (int64_t k = 0; k < n; ++k) u[k] = y[k];
  }
}

// out = keep_phi(y) ? g * scale : 0  (scale = 1 or f)
ROW_KERNEL void phi_grad_row(int64_t kind, const float* y, const float* g, float scale, bool scaled, float* out,
                  int64_t n) {
  if (kind == kRelu) {
    for (int64_t k = 0; k < n; ++k) out[k] = y[k] > 0.f ? (scaled ? g[k] * scale : g[k]) : 0.f;
  } else if (kind == kClip) {
    for (int64_t k = 0; k < n; ++k)
      out[k] = (y[k] >= 0.f) & (y[k] <= 1.f) ? (scaled ? g[k] * scale : g[k]) : 0.f;
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = scaled ? g[k] * scale : g[k];
  }
}

ROW_KERNEL void qa_row(const Cfg& c, const float* u, float* out, int64_t n) {
  switch (c.aq) {
    case kDorefa:
      if (c.bits == 32) {
        for (int64_t k = 0; k < n; ++k) out[k] = qm::clamp(u[k], 0.f, 1.f);
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
        float v = u[k] / s;
        ds += static_cast<double>(g[k] * qm::lsq_r(v, 0.f, qp));
        gu[k] = qm::lsq_keep(v, 0.f, qp) ? g[k] : 0.f;
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
    for (int64_t k = 0; k < n; ++k) out[k] = a[k] + b[k];
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = a[k] - b[k];
  }
}

// The channels behind output channel co: LP channel (or -1) and FP channel (or -1).
inline void sources(const Cfg& c, int64_t co, int64_t& c1, int64_t& c2) {
  if (!c.fp) { c1 = co; c2 = -1; return; }
  if (c.combine == kConcat) {
    c1 = co < c.c_lp ? co : -1;
    c2 = co < c.c_lp ? -1 : co;
    return;
  }
  c1 = co;
  c2 = c.c_lp + co;
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

// dy of one output row's LP channel (into r.g1) and FP channel (into r.g2); returns LSQ's sum.
double backward_row(const Cfg& c, const Norm& nm, int64_t c1, int64_t c2, const float* z1,
                    const float* z2, const float* g, Rows& r) {
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
  if (c1 >= 0) phi_grad_row(c.phi, r.y1, gu, 1.f, false, r.g1, n);
  if (c2 >= 0) phi_grad_row(c.psi, r.y2, gv, negate ? -c.f : c.f, true, r.g2, n);
  return ds;
}

std::tuple<Tensor, Tensor, Tensor> block_epilogue_fwd(
    const Tensor& z, const Tensor& weight, const Tensor& bias, const Tensor& f,
    const c10::optional<Tensor>& step, int64_t c_lp, double eps, int64_t scheme, int64_t combine,
    int64_t a_quant, int64_t a_bits, int64_t phi, int64_t psi) {
  Cfg c = make_cfg(z, f, step, c_lp, scheme, combine, a_quant, a_bits, phi, psi);
  const float* zp = z.const_data_ptr<float>();
  Tensor mean = at::empty({c.c_tot}, z.options());
  Tensor var = at::empty({c.c_tot}, z.options());
  float* mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  const double count = static_cast<double>(c.n * c.hw);
  // statistics: per channel, the mean, then the centered squares (float per row, double across)
  at::parallel_for(0, c.c_tot, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      double s = 0;
      for (int64_t i = 0; i < c.n; ++i) s += row_sum(zp + (i * c.c_tot + ch) * c.hw, c.hw);
      const double m = s / count;
      const float mf = static_cast<float>(m);
      double ss = 0;
      for (int64_t i = 0; i < c.n; ++i) ss += row_sumsq(zp + (i * c.c_tot + ch) * c.hw, mf, c.hw);
      const double dm = m - static_cast<double>(mf);  // the centering error, corrected exactly
      mp[ch] = mf;
      vp[ch] = static_cast<float>(ss / count - dm * dm);
    }
  });
  Norm nm = make_norm(weight, bias, mean, var, eps);
  Tensor out = at::empty({c.n, c.c_out, z.size(2), z.size(3)}, z.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, c.n * c.c_out, 1, [&](int64_t r0, int64_t r1) {
    Rows rows(c.hw);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t i = r / c.c_out, co = r % c.c_out, c1, c2;
      sources(c, co, c1, c2);
      const float* z1 = c1 >= 0 ? zp + (i * c.c_tot + c1) * c.hw : nullptr;
      const float* z2 = c2 >= 0 ? zp + (i * c.c_tot + c2) * c.hw : nullptr;
      forward_row(c, nm, c1, c2, z1, z2, op + r * c.hw, rows);
    }
  });
  return {out, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> block_epilogue_bwd(
    const Tensor& grad, const Tensor& z, const Tensor& weight, const Tensor& bias, const Tensor& f,
    const c10::optional<Tensor>& step, const Tensor& mean, const Tensor& var, int64_t c_lp,
    double eps, int64_t scheme, int64_t combine, int64_t a_quant, int64_t a_bits, int64_t phi,
    int64_t psi) {
  Cfg c = make_cfg(z, f, step, c_lp, scheme, combine, a_quant, a_bits, phi, psi);
  TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == at::kFloat && grad.dim() == 4 &&
                  grad.size(1) == c.c_out,
              "block_epilogue_bwd: grad must be contiguous float32 shaped like the output");
  Norm nm = make_norm(weight, bias, mean, var, eps);
  const float* zp = z.const_data_ptr<float>();
  const float* gp = grad.const_data_ptr<float>();
  const int64_t hw = c.hw;
  std::vector<double> sum_g(c.c_tot, 0.0), sum_gx(c.c_tot, 0.0), ds_part(c.c_out, 0.0);
  // sum over a row of g and of g * xhat
  auto row_sums = [&](const Norm& nm, int64_t ch, const float* zr, const float* gr, double& s,
                      double& sx) {
    float a, b;
    row_sums_bwd(zr, gr, nm.mean[ch], nm.invstd[ch], hw, a, b);
    s += a;
    sx += b;
  };
  // pass 1: per output channel (its LP and FP channels belong to it alone, so no races)
  at::parallel_for(0, c.c_out, 1, [&](int64_t o0, int64_t o1) {
    Rows rows(hw);
    for (int64_t co = o0; co < o1; ++co) {
      int64_t c1, c2;
      sources(c, co, c1, c2);
      double s1 = 0, sx1 = 0, s2 = 0, sx2 = 0, ds = 0;
      for (int64_t i = 0; i < c.n; ++i) {
        const float* z1 = c1 >= 0 ? zp + (i * c.c_tot + c1) * hw : nullptr;
        const float* z2 = c2 >= 0 ? zp + (i * c.c_tot + c2) * hw : nullptr;
        ds += backward_row(c, nm, c1, c2, z1, z2, gp + (i * c.c_out + co) * hw, rows);
        if (z1) row_sums(nm, c1, z1, rows.g1, s1, sx1);
        if (z2) row_sums(nm, c2, z2, rows.g2, s2, sx2);
      }
      if (c1 >= 0) { sum_g[c1] = s1; sum_gx[c1] = sx1; }
      if (c2 >= 0) { sum_g[c2] = s2; sum_gx[c2] = sx2; }
      ds_part[co] = ds;
    }
  });
  const double count = static_cast<double>(c.n * hw);
  std::vector<float> scale(c.c_tot), a(c.c_tot), bcoef(c.c_tot);
  for (int64_t ch = 0; ch < c.c_tot; ++ch) {
    scale[ch] = nm.w[ch] * nm.invstd[ch];
    a[ch] = static_cast<float>(static_cast<float>(sum_g[ch]) / count);
    bcoef[ch] = static_cast<float>(static_cast<float>(sum_gx[ch]) / count);
  }
  // pass 2: dz = scale * (dy - mean(dy) - xhat * mean(dy * xhat)), dy recomputed
  Tensor dz = at::empty_like(z);
  float* dp = dz.data_ptr<float>();
  auto write_dz = [&](int64_t ch, const float* zr, const float* gr, float* dr) {
    row_dz(zr, gr, nm.mean[ch], nm.invstd[ch], scale[ch], a[ch], bcoef[ch], dr, hw);
  };
  at::parallel_for(0, c.n * c.c_out, 1, [&](int64_t r0, int64_t r1) {
    Rows rows(hw);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t i = r / c.c_out, co = r % c.c_out, c1, c2;
      sources(c, co, c1, c2);
      const float* z1 = c1 >= 0 ? zp + (i * c.c_tot + c1) * hw : nullptr;
      const float* z2 = c2 >= 0 ? zp + (i * c.c_tot + c2) * hw : nullptr;
      backward_row(c, nm, c1, c2, z1, z2, gp + r * hw, rows);
      if (z1) write_dz(c1, z1, rows.g1, dp + (i * c.c_tot + c1) * hw);
      if (z2) write_dz(c2, z2, rows.g2, dp + (i * c.c_tot + c2) * hw);
    }
  });
  Tensor dweight = at::empty({c.c_tot}, z.options());
  Tensor dbias = at::empty({c.c_tot}, z.options());
  for (int64_t ch = 0; ch < c.c_tot; ++ch) {
    dweight.data_ptr<float>()[ch] = static_cast<float>(sum_gx[ch]);
    dbias.data_ptr<float>()[ch] = static_cast<float>(sum_g[ch]);
  }
  double ds = 0;
  for (double p : ds_part) ds += p;
  int64_t numel = c.n * hw * ((c.scheme == 1 && c.fp) ? c.c_out : c.c_lp);
  Tensor dstep = at::full({}, c.aq == kLsq ? qm::lsq_step_grad(ds, numel, c.qp) : 0.f, z.options());
  return {dz, dweight.to(weight.scalar_type()), dbias.to(bias.scalar_type()), dstep};
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
}

TORCH_LIBRARY_IMPL(expcuda_C, CPU, m) {
  m.impl("block_epilogue_fwd", &block_epilogue_fwd);
  m.impl("block_epilogue_bwd", &block_epilogue_bwd);
}

}  // namespace expcuda
