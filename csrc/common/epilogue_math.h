// Per-element arithmetic of the block epilogue, shared by the C++ (csrc/cpu/block_cpu.cpp) and
// CUDA (csrc/cuda/block_cuda.cu) kernels; the PyTorch kernels of expcuda/nn/epilogue.py are the
// definition of correct, operation for operation in float32.  The codes (Combine, AQuant, Phi)
// are common/codes.h, generated from expcuda/codes.py.
//
// The CPU rows pick a kind once per row and loop over these functions (so the loops vectorize);
// the CUDA kernels call the dispatching forms (phi, qa, qa_grad) per element.
#pragma once

#include <cstdint>

#include "common/codes.h"
#include "common/quant_math.h"

namespace expcuda {
namespace em {

// BatchNorm with given statistics: xhat = (z - mean) * invstd, y = xhat * w + b (the reference's order).
EXPCUDA_HD float xhat(float z, float mean, float invstd) { return (z - mean) * invstd; }
EXPCUDA_HD float bn(float z, float mean, float invstd, float w, float b) { return xhat(z, mean, invstd) * w + b; }

// phi / psi.  ReLU passes NaN as torch.relu does; clip is torch.clamp(y, 0, 1).
EXPCUDA_HD float relu(float y) { return (y > 0.f || y != y) ? y : 0.f; }
EXPCUDA_HD bool relu_keep(float y) { return y > 0.f; }
EXPCUDA_HD float clip01(float y) { return qm::clamp(y, 0.f, 1.f); }
EXPCUDA_HD bool clip01_keep(float y) { return (y >= 0.f) & (y <= 1.f); }

EXPCUDA_HD float phi(int64_t kind, float y) {
  if (kind == kRelu) return relu(y);
  if (kind == kClip) return clip01(y);
  return y;
}

// Whether phi's gradient passes at y.
EXPCUDA_HD bool phi_keep(int64_t kind, float y) {
  if (kind == kRelu) return relu_keep(y);
  if (kind == kClip) return clip01_keep(y);
  return true;
}

// The add / sub combine of the LP value a and the f-scaled FP value b.
EXPCUDA_HD float combine(int64_t how, float a, float b) { return how == kAdd ? a + b : a - b; }

// Qa forward: DoReFa (bits 32: the clip alone), sign, unsigned LSQ with step s and Qp = levels.
EXPCUDA_HD float qa(int64_t aq, int64_t bits, float levels, float s, float u) {
  switch (aq) {
    case kDorefa: return bits == 32 ? clip01(u) : qm::dorefa_act(u, levels);
    case kSign: return qm::sign(u);
    case kLsq: return qm::lsq_fwd(u, s, 0.f, levels);
    default: return u;
  }
}

// Qa's straight-through gradient at input u; ds gets LSQ's step-gradient term g * r(u / s).
EXPCUDA_HD float qa_grad(int64_t aq, float levels, float s, float u, float g, float& ds) {
  switch (aq) {
    case kDorefa: return qm::dorefa_act_keep(u) ? g : 0.f;
    case kSign: return qm::sign_act_keep(u) ? g : 0.f;
    case kLsq: {
      const float v = u / s;
      ds = g * qm::lsq_r(v, 0.f, levels);
      return qm::lsq_keep(v, 0.f, levels) ? g : 0.f;
    }
    default: return g;
  }
}

// The channels of z behind output channel co: its LP channel c1 and FP channel c2 (-1: none).
EXPCUDA_HD void sources(bool fp, int64_t how, int64_t c_lp, int64_t co, int64_t& c1, int64_t& c2) {
  if (!fp) {
    c1 = co;
    c2 = -1;
  } else if (how == kConcat) {
    c1 = co < c_lp ? co : -1;
    c2 = co < c_lp ? -1 : co;
  } else {
    c1 = co;
    c2 = c_lp + co;
  }
}

}  // namespace em
}  // namespace expcuda
