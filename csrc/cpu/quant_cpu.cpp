// CPU kernels of the expcuda_C quantizers: multithreaded (at::parallel_for), auto-vectorized.
//
// Each kernel reproduces expcuda/quant/reference.py bit for bit: the per-element arithmetic is
// in common/quant_math.h, done in float32 whatever the dtype; sums accumulate in double and
// are rounded to float32 once; tensors are walked as flat storage (inputs are dense).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/codes.h"
#include "common/quant_math.h"

namespace expcuda {
namespace {

using at::Tensor;

constexpr int64_t kGrain = 32768;  // elements per parallel task: amortizes the fork, fits L2
constexpr int64_t kBlock = 512;    // elements per inner block: staged mask bytes stay in L1

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The unsigned integer of T's size: selecting raw bits vectorizes for every float type.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 8, uint64_t,
                                std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

// ============================================================================ ISA clones

// The hot float32 kernels are compiled for AVX-512, AVX2 and baseline x86-64, and the loader
// picks one for the CPU at hand (GCC function multiversioning); the math is the same IEEE
// arithmetic in each (no FMA: -ffp-contract=off), so every clone gives the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(EXPCUDA_NO_CLONES)
#define EXPCUDA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EXPCUDA_CLONES
#endif

// Block helpers must inline into each clone to be compiled for its instruction set.
#if defined(__GNUC__)
#define EXPCUDA_INLINE inline __attribute__((always_inline))
#else
#define EXPCUDA_INLINE inline
#endif

// ============================================================================ per-element ops

// DoReFa activation: value and STE mask.
struct DorefaActOp {
  float lv;
  float value(float v) const { return qm::dorefa_act(v, lv); }
  bool keep(float v) const { return qm::dorefa_act_keep(v); }
};

// sign activation: value and STE mask.
struct SignActOp {
  float value(float v) const { return qm::sign(v); }
  bool keep(float v) const { return qm::sign_act_keep(v); }
};

// LSQ forward.
struct LsqFwdOp {
  float s, qn, qp;
  float operator()(float v) const { return qm::lsq_fwd(v, s, qn, qp); }
};

// ============================================================================ packed masks

// Pack 8 bytes of 0/1 into one byte, bit j from byte j (the multiply gathers without carries).
EXPCUDA_INLINE uint8_t pack8(const uint8_t* b) {
  uint64_t v;
  std::memcpy(&v, b, 8);
  return static_cast<uint8_t>((v * 0x0102040810204080ULL) >> 56);
}

// Spread one mask byte over 8 bytes, byte j nonzero iff bit j is set.
EXPCUDA_INLINE void unpack8(uint8_t m, uint8_t* b) {
  uint64_t v = (m * 0x0101010101010101ULL) & 0x8040201008040201ULL;
  std::memcpy(b, &v, 8);
}

// y = op.value(x) and the packed bits of op.keep(x) for one block (starts on a byte boundary).
template <typename T, typename Op>
EXPCUDA_INLINE void masked_block(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ mask,
                         int64_t len, Op op) {
  alignas(64) uint8_t bits[kBlock];
  for (int64_t j = 0; j < len; ++j) {
    float v = static_cast<float>(x[j]);
    y[j] = static_cast<T>(op.value(v));
    bits[j] = op.keep(v);
  }
  int64_t padded = divup(len, 8) * 8;
  for (int64_t j = len; j < padded; ++j) bits[j] = 0;  // bits past numel are 0, as pack_mask pads
  for (int64_t k = 0; k < padded / 8; ++k) mask[k] = pack8(bits + 8 * k);
}

// One parallel task of a masked map: len elements from a byte boundary, block by block.
template <typename T, typename Op>
void masked_task(const T* x, T* y, uint8_t* mask, int64_t len, Op op) {
  for (int64_t i = 0; i < len; i += kBlock) masked_block(x + i, y + i, mask + i / 8, std::min(kBlock, len - i), op);
}
EXPCUDA_CLONES void masked_task(const float* x, float* y, uint8_t* mask, int64_t len, DorefaActOp op) {
  for (int64_t i = 0; i < len; i += kBlock) masked_block(x + i, y + i, mask + i / 8, std::min(kBlock, len - i), op);
}
EXPCUDA_CLONES void masked_task(const float* x, float* y, uint8_t* mask, int64_t len, SignActOp op) {
  for (int64_t i = 0; i < len; i += kBlock) masked_block(x + i, y + i, mask + i / 8, std::min(kBlock, len - i), op);
}

// Run task(first element, count) over n elements in parallel, each task starting at a multiple of 8.
template <typename Task>
void parallel_bytes(int64_t n, Task task) {
  at::parallel_for(0, divup(n, 8), kGrain / 8, [&](int64_t b0, int64_t b1) {
    task(b0 * 8, std::min(n, b1 * 8) - b0 * 8);
  });
}

// y = op.value(x) over n storage elements, with the packed mask of op.keep(x).
template <typename T, typename Op>
void masked_map(const T* x, T* y, uint8_t* mask, int64_t n, Op op) {
  parallel_bytes(n, [&](int64_t i, int64_t len) { masked_task(x + i, y + i, mask + i / 8, len, op); });
}

// out = g where the packed bit is set, else +0, for one block (starts on a byte boundary).
template <typename U>
EXPCUDA_INLINE void select_block(const U* __restrict__ g, const uint8_t* __restrict__ mask,
                         U* __restrict__ out, int64_t len) {
  alignas(64) uint8_t bits[kBlock];
  for (int64_t k = 0; k < divup(len, 8); ++k) unpack8(mask[k], bits + 8 * k);
  for (int64_t j = 0; j < len; ++j) out[j] = g[j] & static_cast<U>(U(0) - U(bits[j] != 0));  // branch-free
}

// One parallel task of the packed-mask backward, on raw bits (any float type).
template <typename U>
void select_task(const U* g, const uint8_t* mask, U* out, int64_t len) {
  for (int64_t i = 0; i < len; i += kBlock) select_block(g + i, mask + i / 8, out + i, std::min(kBlock, len - i));
}
EXPCUDA_CLONES void select_task(const uint32_t* g, const uint8_t* mask, uint32_t* out, int64_t len) {
  for (int64_t i = 0; i < len; i += kBlock) select_block(g + i, mask + i / 8, out + i, std::min(kBlock, len - i));
}
EXPCUDA_CLONES void select_task(const uint16_t* g, const uint8_t* mask, uint16_t* out, int64_t len) {
  for (int64_t i = 0; i < len; i += kBlock) select_block(g + i, mask + i / 8, out + i, std::min(kBlock, len - i));
}

// out = g where the DoReFa STE condition holds on x, else +0 (the recompute backward).
template <typename T>
void recompute_task(const T* __restrict__ x, const Bits<T>* __restrict__ g, Bits<T>* __restrict__ out, int64_t len) {
  using U = Bits<T>;
  for (int64_t j = 0; j < len; ++j)
    out[j] = g[j] & static_cast<U>(U(0) - U(qm::dorefa_act_keep(static_cast<float>(x[j]))));  // branch-free
}
EXPCUDA_CLONES void recompute_task(const float* __restrict__ x, const uint32_t* __restrict__ g,
                                   uint32_t* __restrict__ out, int64_t len) {
  for (int64_t j = 0; j < len; ++j) out[j] = g[j] & (0u - uint32_t(qm::dorefa_act_keep(x[j])));
}

// ============================================================================ elementwise maps

// y = f(x) over len elements (x may be a float32 intermediate such as tanh).
template <typename T, typename Y, typename F>
void map_task(const T* __restrict__ x, Y* __restrict__ y, int64_t len, F f) {
  for (int64_t i = 0; i < len; ++i) y[i] = static_cast<Y>(f(static_cast<float>(x[i])));
}
EXPCUDA_CLONES void map_task(const float* __restrict__ x, float* __restrict__ y, int64_t len, LsqFwdOp f) {
  for (int64_t i = 0; i < len; ++i) y[i] = f(x[i]);
}

// y = f(x) elementwise over n storage elements, in parallel.
template <typename T, typename Y, typename F>
void map(const T* x, Y* y, int64_t n, F f) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { map_task(x + b, y + b, e - b, f); });
}

// ============================================================================ reductions

// Sum of term(i) over [b, e) in double; 8 independent accumulators let the loop vectorize.
template <typename Term>
EXPCUDA_INLINE double range_sum(int64_t b, int64_t e, Term term) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = b;
  for (; i + 8 <= e; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(term(i + j));
  double tail = 0;
  for (; i < e; ++i) tail += static_cast<double>(term(i));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// Sum over [0, n) in double: fixed chunks in parallel, partials added in chunk order
// (deterministic whatever the thread count).
template <typename Term>
double parallel_sum(int64_t n, Term term) {
  int64_t chunks = divup(n, kGrain);
  std::vector<double> part(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) part[c] = range_sum(c * kGrain, std::min(n, (c + 1) * kGrain), term);
  });
  double total = 0;
  for (double p : part) total += p;
  return total;
}

// max |x[i]| over [b, e), NaN if any is NaN (torch.amax); exact in any order.
template <typename T>
float range_amax_abs(const T* __restrict__ x, int64_t b, int64_t e) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = b;
  for (; i + 8 <= e; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] = qm::nan_max(fabsf(static_cast<float>(x[i + j])), acc[j]);
  float m = 0;
  for (; i < e; ++i) m = qm::nan_max(fabsf(static_cast<float>(x[i])), m);
  for (int j = 0; j < 8; ++j) m = qm::nan_max(acc[j], m);
  return m;
}

// The float32 case with the select written as a conditional, which GCC turns into vector
// compares and blends (qm::select's bit arithmetic stays scalar); the same NaN rule as nan_max.
EXPCUDA_CLONES float range_amax_abs(const float* __restrict__ x, int64_t b, int64_t e) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = b;
  for (; i + 8 <= e; i += 8)
    for (int j = 0; j < 8; ++j) {
      float a = fabsf(x[i + j]);
      acc[j] = (a > acc[j]) | (a != a) ? a : acc[j];
    }
  float m = 0;
  for (; i < e; ++i) m = qm::nan_max(fabsf(x[i]), m);
  for (int j = 0; j < 8; ++j) m = qm::nan_max(acc[j], m);
  return m;
}

// max |x| over the whole tensor (dense), NaN-propagating.
template <typename T>
float amax_abs(const T* x, int64_t n) {
  int64_t chunks = divup(n, kGrain);
  std::vector<float> part(chunks, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) part[c] = range_amax_abs(x, c * kGrain, std::min(n, (c + 1) * kGrain));
  });
  float m = 0;
  for (float p : part) m = qm::nan_max(p, m);
  return m;
}

// ============================================================================ checks

void check_dense(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "expcuda_C CPU kernel: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "expcuda_C: ", name,
              " must be dense (contiguous, channels_last or another dense layout)");
}

void check_bits(int64_t bits, int64_t lo) {
  TORCH_CHECK(bits >= lo && bits <= 32, "expcuda_C: bits must be in [", lo, ", 32], got ", bits);
}

// grad in x's storage layout and dtype, so both walk their storage in step.
Tensor like_layout(const Tensor& grad, const Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes(), "expcuda_C: grad shape ", grad.sizes(),
              " does not match ", x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "expcuda_C: grad dtype ", grad.scalar_type(),
              " does not match ", x.scalar_type());
  if (grad.strides() == x.strides()) return grad;
  return at::empty_like(x).copy_(grad);
}

// A scalar tensor's value as float32 (the reference's .to(float32).reshape(())).
float scalar_value(const Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "expcuda_C: ", name, " must have one element, got ", t.numel());
  return t.to(at::kFloat).item<float>();
}

// ============================================================================ activations

std::tuple<Tensor, Tensor> dorefa_activation_fwd(const Tensor& x, int64_t bits) {
  check_dense(x, "x");
  check_bits(bits, 1);
  int64_t n = x.numel();
  // y before the small mask: a freed gradient of x's size is then reused whole by y instead of
  // being split by the mask (a loop of forward + backward on 128x32x18x18: 181 page faults per
  // call with the mask first, 0 after)
  Tensor y = bits == 32 ? x.clone() : at::empty_like(x);
  Tensor mask = at::empty({divup(n, 8)}, x.options().dtype(at::kByte));
  if (bits == 32) {  // no quantization: y = x, every mask bit set (bits past numel stay 0)
    std::memset(mask.data_ptr<uint8_t>(), 0xFF, n / 8);
    if (n % 8) mask.data_ptr<uint8_t>()[n / 8] = static_cast<uint8_t>((1u << (n % 8)) - 1);
    return {y, mask};
  }
  float lv = qm::levels(bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dorefa_activation_fwd", [&] {
    masked_map(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
               mask.mutable_data_ptr<uint8_t>(), n, DorefaActOp{lv});
  });
  return {y, mask};
}

std::tuple<Tensor, Tensor> sign_activation_fwd(const Tensor& x) {
  check_dense(x, "x");
  int64_t n = x.numel();
  Tensor y = at::empty_like(x);  // before the mask, as in dorefa_activation_fwd
  Tensor mask = at::empty({divup(n, 8)}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sign_activation_fwd", [&] {
    masked_map(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
               mask.mutable_data_ptr<uint8_t>(), n, SignActOp{});
  });
  return {y, mask};
}

Tensor mask_bwd(const Tensor& grad, const Tensor& mask) {
  check_dense(grad, "grad");
  int64_t n = grad.numel();
  TORCH_CHECK(mask.is_cpu() && mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.numel() == divup(n, 8),
              "expcuda_C: mask must be a contiguous uint8 CPU tensor of ceil(numel/8) = ", divup(n, 8), " bytes");
  Tensor dx = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mask_bwd", [&] {
    using U = Bits<scalar_t>;
    const U* g = reinterpret_cast<const U*>(grad.const_data_ptr<scalar_t>());
    U* out = reinterpret_cast<U*>(dx.mutable_data_ptr<scalar_t>());
    const uint8_t* m = mask.const_data_ptr<uint8_t>();
    parallel_bytes(n, [&](int64_t i, int64_t len) { select_task(g + i, m + i / 8, out + i, len); });
  });
  return dx;
}

Tensor dorefa_activation_bwd_recompute(const Tensor& grad_in, const Tensor& x, int64_t bits) {
  check_dense(x, "x");
  check_bits(bits, 1);
  Tensor grad = like_layout(grad_in, x);
  if (bits == 32) return grad.clone();  // every STE bit is set
  Tensor dx = at::empty_like(x);
  int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dorefa_activation_bwd_recompute", [&] {
    using U = Bits<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const U* g = reinterpret_cast<const U*>(grad.const_data_ptr<scalar_t>());
    U* out = reinterpret_cast<U*>(dx.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { recompute_task(xs + b, g + b, out + b, e - b); });
  });
  return dx;
}

// ============================================================================ DoReFa weights

Tensor dorefa_weight_fwd(const Tensor& w_in, int64_t bits) {
  check_bits(bits, 1);
  Tensor w = w_in.contiguous();
  int64_t n = w.numel();
  Tensor out = at::empty_like(w);
  if (bits == 1) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dorefa_weight_fwd", [&] {
      const scalar_t* ws = w.const_data_ptr<scalar_t>();
      double total = parallel_sum(n, [ws](int64_t i) { return fabsf(static_cast<float>(ws[i])); });
      float e = static_cast<float>(total / static_cast<double>(n));  // E = mean|w|, one rounding
      map(ws, out.mutable_data_ptr<scalar_t>(), n, [e](float v) { return qm::dorefa_w1(v, e); });
    });
    return out;
  }
  Tensor t = at::tanh(w.to(at::kFloat)).contiguous();  // ATen's tanh, as the reference
  const float* ts = t.const_data_ptr<float>();
  float m = amax_abs(ts, n);
  if (m == 0) return at::zeros_like(w);
  float d = 2.f * m, lv = qm::levels(bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dorefa_weight_fwd", [&] {
    map(ts, out.mutable_data_ptr<scalar_t>(), n, [d, lv](float v) { return qm::dorefa_wk(v, d, lv); });
  });
  return out;
}

Tensor dorefa_weight_bwd(const Tensor& grad, const Tensor& w_in, int64_t bits) {
  check_bits(bits, 1);
  Tensor w = w_in.contiguous();
  TORCH_CHECK(grad.sizes() == w.sizes(), "expcuda_C: grad shape does not match w");
  if (bits == 1) {  // sign's STE passes the gradient unchanged: a fresh copy in w's dtype
    Tensor out = at::empty_like(w);
    return out.copy_(grad);
  }
  Tensor g = grad.to(at::kFloat).contiguous();
  Tensor t = at::tanh(w.to(at::kFloat)).contiguous();
  const float* ts = t.const_data_ptr<float>();
  const float* gs = g.const_data_ptr<float>();
  int64_t n = w.numel();
  float m = amax_abs(ts, n);
  if (m == 0) return at::zeros_like(w);
  float d = 2.f * m;
  // S = sum (2g)(t/d); the elements attaining max|t| share -2 S / d evenly
  double s = parallel_sum(n, [gs, ts, d](int64_t i) { return qm::dorefa_wk_sum_term(gs[i], ts[i], d); });
  double ties = parallel_sum(n, [ts, m](int64_t i) { return static_cast<float>(fabsf(ts[i]) == m); });
  float share = static_cast<float>(-2.0 * s / static_cast<double>(d) / ties);
  Tensor out = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dorefa_weight_bwd", [&] {
    scalar_t* os = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        os[i] = static_cast<scalar_t>(qm::dorefa_wk_grad(gs[i], ts[i], d, fabsf(ts[i]) == m, share));
    });
  });
  return out;
}

// ============================================================================ XNOR weights

// Output filters and the elements per filter of a rank >= 2 weight (0 per filter when it has
// none: an empty weight, over which the loops below do nothing).
std::pair<int64_t, int64_t> filters(const Tensor& w) {
  TORCH_CHECK(w.dim() >= 2, "expcuda_C: XNOR weights need rank >= 2 (out, in, ...), got rank ", w.dim());
  const int64_t filt = w.size(0);
  return {filt, filt == 0 ? 0 : w.numel() / filt};
}

// Filters per parallel task: about kGrain elements.
int64_t filter_grain(int64_t per) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(per, 1)); }

Tensor xnor_weight_fwd(const Tensor& w_in) {
  Tensor w = w_in.contiguous();
  auto [filt, per] = filters(w);
  Tensor out = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "xnor_weight_fwd", [&] {
    const scalar_t* ws = w.const_data_ptr<scalar_t>();
    scalar_t* os = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, filt, filter_grain(per), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const scalar_t* wo = ws + o * per;
        double sum = range_sum(0, per, [wo](int64_t i) { return fabsf(static_cast<float>(wo[i])); });
        float alpha = static_cast<float>(sum / static_cast<double>(per));
        for (int64_t i = 0; i < per; ++i)
          os[o * per + i] = static_cast<scalar_t>(qm::xnor_fwd(static_cast<float>(wo[i]), alpha));
      }
    });
  });
  return out;
}

Tensor xnor_weight_bwd(const Tensor& grad, const Tensor& w_in) {
  Tensor w = w_in.contiguous();
  auto [filt, per] = filters(w);
  TORCH_CHECK(grad.sizes() == w.sizes(), "expcuda_C: grad shape does not match w");
  Tensor g = grad.to(at::kFloat).contiguous();
  Tensor out = at::empty_like(w);
  const float* gs = g.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "xnor_weight_bwd", [&] {
    const scalar_t* ws = w.const_data_ptr<scalar_t>();
    scalar_t* os = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, filt, filter_grain(per), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const scalar_t* wo = ws + o * per;
        const float* go = gs + o * per;
        double sa = range_sum(0, per, [wo](int64_t i) { return fabsf(static_cast<float>(wo[i])); });
        double st = range_sum(0, per, [wo, go](int64_t i) {
          return qm::xnor_sum_term(go[i], static_cast<float>(wo[i]));
        });
        float alpha = static_cast<float>(sa / static_cast<double>(per));
        float tm = static_cast<float>(st / static_cast<double>(per));
        for (int64_t i = 0; i < per; ++i)
          os[o * per + i] = static_cast<scalar_t>(qm::xnor_grad(go[i], static_cast<float>(wo[i]), alpha, tm));
      }
    });
  });
  return out;
}

// ============================================================================ SYQ weights

// How the scales broadcast: the weight is (outer, P) with P = kh*kw kernel positions (1 for
// "layer"); scale_of[p] is the scale index of position p, and there are G scales.
struct SyqLayout {
  int64_t outer, positions, groups;
  std::vector<int64_t> scale_of;
};

SyqLayout syq_layout(const Tensor& w, const Tensor& scales, int64_t granularity) {
  TORCH_CHECK(granularity >= kLayer && granularity <= kPixel, "expcuda_C: granularity must be 0 (layer), 1 (row) or 2 (pixel)");
  if (granularity == kLayer) {
    TORCH_CHECK(scales.numel() == 1, "expcuda_C: layer granularity needs one scale, got ", scales.numel());
    return {w.numel(), 1, 1, {0}};
  }
  TORCH_CHECK(w.dim() == 4, "expcuda_C: row/pixel granularity needs a (out, in, kh, kw) weight, got rank ", w.dim());
  int64_t kh = w.size(2), kw = w.size(3);
  int64_t groups = granularity == kRow ? kh : kh * kw;
  TORCH_CHECK(scales.numel() == groups, "expcuda_C: ", granularity == kRow ? "row" : "pixel",
              " granularity needs ", groups, " scales, got ", scales.numel());
  SyqLayout lay{w.numel() / (kh * kw), kh * kw, groups, std::vector<int64_t>(kh * kw)};
  for (int64_t p = 0; p < kh * kw; ++p) lay.scale_of[p] = granularity == kRow ? p / kw : p;
  return lay;
}

// The weight is processed in chunks of kSyqRows rows of P positions, against a pattern holding
// each position's float32 scale kSyqRows times: the inner loops run over contiguous elements,
// with no per-element modulo, and vectorize (a loop over P = 9 positions does not).
constexpr int64_t kSyqRows = 16;

std::vector<float> syq_scale_pattern(const SyqLayout& lay, const Tensor& scales) {
  Tensor sc = scales.to(at::kFloat).contiguous();
  std::vector<float> pat(kSyqRows * lay.positions);
  for (int64_t j = 0; j < kSyqRows * lay.positions; ++j)
    pat[j] = sc.const_data_ptr<float>()[lay.scale_of[j % lay.positions]];
  return pat;
}

// fn(first element, element count) for every chunk of at most kSyqRows rows, in parallel.
template <typename Fn>
void syq_chunks(const SyqLayout& lay, Fn fn) {
  const int64_t P = lay.positions;
  at::parallel_for(0, lay.outer, std::max<int64_t>(1, kGrain / P), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o += kSyqRows) fn(o * P, std::min(kSyqRows, o1 - o) * P);
  });
}

template <typename T>
EXPCUDA_INLINE void syq_fwd_block(const T* __restrict__ w, T* __restrict__ out, const float* __restrict__ pat,
                                  int64_t len, float thr) {
  for (int64_t j = 0; j < len; ++j) out[j] = static_cast<T>(qm::syq_fwd(static_cast<float>(w[j]), thr, pat[j]));
}
template <typename T>
EXPCUDA_INLINE void syq_dw_block(const float* __restrict__ g, T* __restrict__ out, const float* __restrict__ pat,
                                 int64_t len) {
  for (int64_t j = 0; j < len; ++j) out[j] = static_cast<T>(qm::syq_dw(g[j], pat[j]));
}
// acc[j] += the scale-gradient term of element j (double lanes, one per pattern slot)
template <typename T>
EXPCUDA_INLINE void syq_sum_block(const T* __restrict__ w, const float* __restrict__ g, double* __restrict__ acc,
                                  int64_t len, float thr) {
  for (int64_t j = 0; j < len; ++j) acc[j] += static_cast<double>(qm::syq_sum_term(g[j], static_cast<float>(w[j]), thr));
}
template <typename T>
void syq_fwd_chunk(const T* w, T* out, const float* pat, int64_t len, float thr) { syq_fwd_block(w, out, pat, len, thr); }
EXPCUDA_CLONES void syq_fwd_chunk(const float* w, float* out, const float* pat, int64_t len, float thr) {
  syq_fwd_block(w, out, pat, len, thr);
}
template <typename T>
void syq_dw_chunk(const float* g, T* out, const float* pat, int64_t len) { syq_dw_block(g, out, pat, len); }
EXPCUDA_CLONES void syq_dw_chunk(const float* g, float* out, const float* pat, int64_t len) {
  syq_dw_block(g, out, pat, len);
}
template <typename T>
void syq_sum_chunk(const T* w, const float* g, double* acc, int64_t len, float thr) { syq_sum_block(w, g, acc, len, thr); }
EXPCUDA_CLONES void syq_sum_chunk(const float* w, const float* g, double* acc, int64_t len, float thr) {
  syq_sum_block(w, g, acc, len, thr);
}

// thr = float32(eta) * max|w|.
template <typename T>
float syq_threshold(const T* w, int64_t n, double eta) {
  return static_cast<float>(eta) * amax_abs(w, n);
}

Tensor syq_weight_fwd(const Tensor& w_in, const Tensor& scales, double eta, int64_t granularity) {
  Tensor w = w_in.contiguous();
  SyqLayout lay = syq_layout(w, scales, granularity);
  std::vector<float> pat = syq_scale_pattern(lay, scales);
  Tensor out = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "syq_weight_fwd", [&] {
    const scalar_t* ws = w.const_data_ptr<scalar_t>();
    scalar_t* os = out.mutable_data_ptr<scalar_t>();
    float thr = syq_threshold(ws, w.numel(), eta);
    syq_chunks(lay, [&](int64_t i, int64_t len) { syq_fwd_chunk(ws + i, os + i, pat.data(), len, thr); });
  });
  return out;
}

// dalpha: per-position double sums of the masked sign(w) g over outer chunks, then per group.
template <typename T>
std::vector<double> syq_scale_grad(const T* ws, const float* gs, float thr, const SyqLayout& lay) {
  int64_t P = lay.positions;
  int64_t og = filter_grain(P), chunks = divup(lay.outer, og);
  std::vector<double> part(chunks * P, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> lanes(kSyqRows * P);
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(lanes.begin(), lanes.end(), 0.0);
      const int64_t end = std::min(lay.outer, (c + 1) * og);
      for (int64_t o = c * og; o < end; o += kSyqRows)
        syq_sum_chunk(ws + o * P, gs + o * P, lanes.data(), std::min(kSyqRows, end - o) * P, thr);
      for (int64_t r = 0; r < kSyqRows; ++r)
        for (int64_t p = 0; p < P; ++p) part[c * P + p] += lanes[r * P + p];
    }
  });
  std::vector<double> ds(lay.groups, 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t p = 0; p < P; ++p) ds[lay.scale_of[p]] += part[c * P + p];
  return ds;
}

std::tuple<Tensor, Tensor> syq_weight_bwd(const Tensor& grad, const Tensor& w_in, const Tensor& scales,
                                          double eta, int64_t granularity) {
  Tensor w = w_in.contiguous();
  SyqLayout lay = syq_layout(w, scales, granularity);
  TORCH_CHECK(grad.sizes() == w.sizes(), "expcuda_C: grad shape does not match w");
  Tensor g = grad.to(at::kFloat).contiguous();
  std::vector<float> pat = syq_scale_pattern(lay, scales);
  Tensor dw = at::empty_like(w);
  Tensor ds32 = at::empty({lay.groups}, scales.options().dtype(at::kFloat));
  const float* gs = g.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "syq_weight_bwd", [&] {
    const scalar_t* ws = w.const_data_ptr<scalar_t>();
    scalar_t* os = dw.mutable_data_ptr<scalar_t>();
    float thr = syq_threshold(ws, w.numel(), eta);
    syq_chunks(lay, [&](int64_t i, int64_t len) { syq_dw_chunk(gs + i, os + i, pat.data(), len); });
    std::vector<double> ds = syq_scale_grad(ws, gs, thr, lay);
    for (int64_t k = 0; k < lay.groups; ++k) ds32.mutable_data_ptr<float>()[k] = static_cast<float>(ds[k]);
  });
  return {dw, ds32.to(scales.scalar_type()).view(scales.sizes())};
}

// ============================================================================ LSQ

// The clipping range (Qn, Qp) of reference.lsq_range.
std::pair<float, float> lsq_range(int64_t bits, bool is_signed) {
  TORCH_CHECK(bits >= 1 && bits <= 32, "expcuda_C: LSQ bits must be in [1, 32], got ", bits);
  if (is_signed) return {-static_cast<float>(std::ldexp(1.0, bits - 1)), qm::levels(bits - 1)};
  return {0.f, qm::levels(bits)};
}

Tensor lsq_fwd(const Tensor& x, const Tensor& step, int64_t bits, bool is_signed) {
  check_dense(x, "x");
  auto [qn, qp] = lsq_range(bits, is_signed);
  float s = scalar_value(step, "step");
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lsq_fwd", [&] {
    map(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.numel(), LsqFwdOp{s, qn, qp});
  });
  return y;
}

// LSQ backward over one block: dx, and the float32 products g * r staged for the double sum.
template <typename T>
EXPCUDA_INLINE void lsq_bwd_block(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ dx,
                          float* __restrict__ prod, int64_t len, float s, float qn, float qp) {
  for (int64_t j = 0; j < len; ++j) {
    float v = static_cast<float>(x[j]) / s;
    float gf = static_cast<float>(g[j]);
    dx[j] = static_cast<T>(qm::select(qm::lsq_keep(v, qn, qp), gf, 0.f));
    prod[j] = gf * qm::lsq_r(v, qn, qp);
  }
}

// The step gradient's partial sum over len elements, writing dx there too.
template <typename T>
EXPCUDA_INLINE double lsq_bwd_blocks(const T* x, const T* g, T* dx, int64_t len, float s, float qn, float qp) {
  alignas(64) float prod[kBlock];
  double total = 0;
  for (int64_t i = 0; i < len; i += kBlock) {
    int64_t m = std::min(kBlock, len - i);
    lsq_bwd_block(x + i, g + i, dx + i, prod, m, s, qn, qp);
    total += range_sum(0, m, [&prod](int64_t j) { return prod[j]; });
  }
  return total;
}
template <typename T>
double lsq_bwd_task(const T* x, const T* g, T* dx, int64_t len, float s, float qn, float qp) {
  return lsq_bwd_blocks(x, g, dx, len, s, qn, qp);
}
EXPCUDA_CLONES double lsq_bwd_task(const float* x, const float* g, float* dx, int64_t len, float s, float qn, float qp) {
  return lsq_bwd_blocks(x, g, dx, len, s, qn, qp);
}

std::tuple<Tensor, Tensor> lsq_bwd(const Tensor& grad_in, const Tensor& x, const Tensor& step,
                                   int64_t bits, bool is_signed) {
  check_dense(x, "x");
  auto [qn, qp] = lsq_range(bits, is_signed);
  float s = scalar_value(step, "step");
  Tensor grad = like_layout(grad_in, x);
  Tensor dx = at::empty_like(x);
  int64_t n = x.numel();
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lsq_bwd", [&] {
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* gs = grad.const_data_ptr<scalar_t>();
    scalar_t* ds = dx.mutable_data_ptr<scalar_t>();
    int64_t chunks = divup(n, kGrain);
    std::vector<double> part(chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        part[c] = lsq_bwd_task(xs + c * kGrain, gs + c * kGrain, ds + c * kGrain,
                               std::min(n, (c + 1) * kGrain) - c * kGrain, s, qn, qp);
    });
    for (double p : part) total += p;
  });
  Tensor dstep = at::full({}, qm::lsq_step_grad(total, n, qp), step.options().dtype(at::kFloat));
  return {dx, dstep.to(step.scalar_type()).view(step.sizes())};
}

}  // namespace

// The quantizers' schemas (granularity codes: csrc/common/codes.h).
TORCH_LIBRARY_FRAGMENT(expcuda_C, m) {
  // activations: the STE mask comes back packed, 8 storage elements a byte, little-endian bits
  m.def("dorefa_activation_fwd(Tensor x, int bits) -> (Tensor, Tensor)");
  m.def("mask_bwd(Tensor grad, Tensor mask) -> Tensor");
  m.def("sign_activation_fwd(Tensor x) -> (Tensor, Tensor)");
  // the STE backward recomputing the mask from x: the alternative the benchmarks compare against
  m.def("dorefa_activation_bwd_recompute(Tensor grad, Tensor x, int bits) -> Tensor");
  // weights
  m.def("dorefa_weight_fwd(Tensor w, int bits) -> Tensor");
  m.def("dorefa_weight_bwd(Tensor grad, Tensor w, int bits) -> Tensor");
  m.def("xnor_weight_fwd(Tensor w) -> Tensor");
  m.def("xnor_weight_bwd(Tensor grad, Tensor w) -> Tensor");
  m.def("syq_weight_fwd(Tensor w, Tensor scales, float eta, int granularity) -> Tensor");
  m.def("syq_weight_bwd(Tensor grad, Tensor w, Tensor scales, float eta, int granularity)"
        " -> (Tensor, Tensor)");
  // LSQ
  m.def("lsq_fwd(Tensor x, Tensor step, int bits, bool signed) -> Tensor");
  m.def("lsq_bwd(Tensor grad, Tensor x, Tensor step, int bits, bool signed) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(expcuda_C, CPU, m) {
  m.impl("dorefa_activation_fwd", &dorefa_activation_fwd);
  m.impl("mask_bwd", &mask_bwd);
  m.impl("sign_activation_fwd", &sign_activation_fwd);
  m.impl("dorefa_activation_bwd_recompute", &dorefa_activation_bwd_recompute);
  m.impl("dorefa_weight_fwd", &dorefa_weight_fwd);
  m.impl("dorefa_weight_bwd", &dorefa_weight_bwd);
  m.impl("xnor_weight_fwd", &xnor_weight_fwd);
  m.impl("xnor_weight_bwd", &xnor_weight_bwd);
  m.impl("syq_weight_fwd", &syq_weight_fwd);
  m.impl("syq_weight_bwd", &syq_weight_bwd);
  m.impl("lsq_fwd", &lsq_fwd);
  m.impl("lsq_bwd", &lsq_bwd);
}

}  // namespace expcuda
