// Per-element quantizer arithmetic shared by the C++ (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// Every function repeats expcuda/quant/reference.py operation for operation, in float32,
// so that all backends agree bit for bit.  Rules (see reference.py's docstring):
//   * round is round-half-to-even, like torch.round;
//   * sign(v) = (v > 0) - (v < 0), so sign(0) = sign(NaN) = 0;
//   * clamp propagates NaN, like torch.clamp;
//   * divisions are true IEEE divisions, never a multiply by a reciprocal;
//   * no fused multiply-add: the build passes -ffp-contract=off and nvcc --fmad=false.
// The functions are branch-free selects so that GCC auto-vectorizes the CPU loops.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define EXPCUDA_HD __host__ __device__ __forceinline__
#else
#define EXPCUDA_HD inline
#endif

namespace expcuda {
namespace qm {

// 2^23: every float with |v| >= 2^23 is already an integer.
constexpr float kTwo23 = 8388608.0f;

// The number of levels 2^bits - 1 as reference.py's Python float, rounded to float32 like torch does.
inline float levels(int64_t bits) {
  return static_cast<float>(std::ldexp(1.0, static_cast<int>(bits)) - 1.0);
}

// c ? a : b.  On the host it is a bitwise blend: GCC turns a plain ?: followed by arithmetic
// into branches around that arithmetic, which (FP ops may trap) it then refuses to vectorize.
EXPCUDA_HD float select(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  uint32_t ua, ub, m = 0u - static_cast<uint32_t>(c);
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  uint32_t u = (ua & m) | (ub & ~m);
  float r;
  std::memcpy(&r, &u, 4);
  return r;
#endif
}

// torch.round: round half to even, NaN/Inf kept, the sign of zero kept (round(-0.3) = -0).
EXPCUDA_HD float round_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);  // cvt.rni: round to nearest even
#else
  // |v| + 2^23 lands in [2^23, 2^24] whose ulp is 1, so the add rounds |v| half-even to an
  // integer; larger values (already integers), Inf and NaN get + 0 - 0 instead.  Selecting the
  // constant rather than the result keeps the loop free of branches for the vectorizer.
  float a = fabsf(v);
  float c = select(a < kTwo23, kTwo23, 0.f);
  return copysignf((a + c) - c, v);
#endif
}

// sign with sign(0) = sign(NaN) = 0, as the float the reference multiplies with.
EXPCUDA_HD float sign(float v) {
  return static_cast<float>(v > 0.f) - static_cast<float>(v < 0.f);
}

// torch.clamp(v, lo, hi): NaN passes, and a bound equal to v leaves v (clamp(-0, 0, 1) = -0).
EXPCUDA_HD float clamp(float v, float lo, float hi) {
  v = select(v < lo, lo, v);
  return select(hi < v, hi, v);
}

// ----------------------------------------------------------------------------- activations

// DoReFa activation: round(clamp(x, 0, 1) * n) / n.
EXPCUDA_HD float dorefa_act(float x, float n) {
  return round_even(clamp(x, 0.f, 1.f) * n) / n;
}

// DoReFa activation STE mask: 0 <= x <= 1 (false for NaN).
EXPCUDA_HD bool dorefa_act_keep(float x) {
  return (x >= 0.f) & (x <= 1.f);
}

// sign activation STE mask: |x| <= 1 (false for NaN).
EXPCUDA_HD bool sign_act_keep(float x) {
  return fabsf(x) <= 1.f;
}

// ----------------------------------------------------------------------------- DoReFa weights

// k = 1: sign(w) * E, with E = mean|w| already rounded to float32.
EXPCUDA_HD float dorefa_w1(float w, float e) {
  return sign(w) * e;
}

// k >= 2, t = tanh(w), d = 2 * max|t|: 2 * round((t / d + 0.5) * n) / n - 1.
EXPCUDA_HD float dorefa_wk(float t, float d, float n) {
  float x = t / d + 0.5f;
  float r = round_even(x * n);
  return (2.f * r) / n - 1.f;
}

// k >= 2 backward: the term (2g) * (t / d) summed (in double) into S.
EXPCUDA_HD float dorefa_wk_sum_term(float g, float t, float d) {
  return (2.f * g) * (t / d);
}

// k >= 2 backward: (2g / d + [|t| == m] sign(t) * share) * (1 - t^2).
EXPCUDA_HD float dorefa_wk_grad(float g, float t, float d, bool tie, float share) {
  float extra = select(tie, sign(t) * share, 0.f);
  float dt = (2.f * g) / d + extra;
  return dt * (1.f - t * t);
}

// ----------------------------------------------------------------------------- XNOR weights

// forward: sign(w) * alpha_o.
EXPCUDA_HD float xnor_fwd(float w, float alpha) {
  return sign(w) * alpha;
}

// backward: the term sign(w) * g summed (in double) per output filter.
EXPCUDA_HD float xnor_sum_term(float g, float w) {
  return sign(w) * g;
}

// backward: [|w| <= 1] alpha_o g + sign(w) * T_o, T_o = mean of sign(w) g over the filter.
EXPCUDA_HD float xnor_grad(float g, float w, float alpha, float t) {
  float direct = select(fabsf(w) <= 1.f, alpha * g, 0.f);
  return direct + sign(w) * t;
}

// ----------------------------------------------------------------------------- SYQ weights

// forward: (sign(w) * [|w| > thr]) * alpha_g.
EXPCUDA_HD float syq_fwd(float w, float thr, float scale) {
  float keep = static_cast<float>(fabsf(w) > thr);
  return (sign(w) * keep) * scale;
}

// backward dw: alpha_g * g everywhere (no mask, no clipping).
EXPCUDA_HD float syq_dw(float g, float scale) {
  return scale * g;
}

// backward: the term [|w| > thr] sign(w) * g summed (in double) into dalpha_g.
EXPCUDA_HD float syq_sum_term(float g, float w, float thr) {
  return select(fabsf(w) > thr, sign(w) * g, 0.f);
}

// ----------------------------------------------------------------------------- LSQ

// forward: round(clamp(x / s, Qn, Qp)) * s.
EXPCUDA_HD float lsq_fwd(float x, float s, float qn, float qp) {
  return round_even(clamp(x / s, qn, qp)) * s;
}

// STE mask on v = x / s: Qn <= v <= Qp (false for NaN).
EXPCUDA_HD bool lsq_keep(float v, float qn, float qp) {
  return (v >= qn) & (v <= qp);
}

// the step-gradient factor: round(v) - v inside, Qn below, Qp above (and Qp for NaN).
EXPCUDA_HD float lsq_r(float v, float qn, float qp) {
  float outside = select(v < qn, qn, qp);
  return select(lsq_keep(v, qn, qp), round_even(v) - v, outside);
}

// the scalar step gradient: total / sqrt(numel * Qp), in double, rounded to float32 once.
EXPCUDA_HD float lsq_step_grad(double total, int64_t numel, float qp) {
  return static_cast<float>(total / sqrt(static_cast<double>(numel) * static_cast<double>(qp)));
}

// The reference's NaN-propagating max of two values (torch.amax propagates NaN).
EXPCUDA_HD float nan_max(float a, float b) {
  return select((a > b) | (a != a), a, b);
}

}  // namespace qm
}  // namespace expcuda
