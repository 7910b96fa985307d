// CUDA kernels of the expcuda_C quantizers.
//
// Same per-element arithmetic as the CPU kernels (common/quant_math.h, float32 whatever the
// dtype, built with --fmad=false and IEEE division), so that both reproduce
// expcuda/quant/reference.py bit for bit.  Elementwise kernels are grid-stride loops over the
// flat storage; sums go through per-block double partials added by one final block (no
// atomics: deterministic); max|x| is an exact NaN-propagating block reduction.  Scalars that
// a later kernel needs (max, mean, step) stay on the device: nothing synchronizes the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/codes.h"
#include "common/quant_math.h"

namespace expcuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;         // threads per block (a multiple of the warp size)
constexpr int64_t kMaxBlocks = 8192;  // cap for grid-stride loops

__host__ __device__ inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n items.
int grid_for(int64_t n) { return static_cast<int>(std::clamp<int64_t>(divup(n, kThreads), 1, kMaxBlocks)); }

// Blocks of a partial-sum (or max) pass over n items: as many as the device holds resident at
// once (every multiprocessor full), fewer for small n.  One final block adds the partials.
int reduce_grid(int64_t n) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident = int64_t(prop->multiProcessorCount) * (prop->maxThreadsPerMultiProcessor / kThreads);
  return static_cast<int>(std::clamp<int64_t>(divup(n, kThreads), 1, std::max<int64_t>(resident, 1)));
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// ============================================================================ device helpers

// Sum over the block in double; the result is valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double warp_part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_part[threadIdx.x] : 0.0;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // warp_part may be reused by the next call
  return v;
}

// NaN-propagating max over the block (exact in any order); valid in thread 0.
__device__ float block_max(float v) {
  __shared__ float warp_part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v = qm::nan_max(__shfl_down_sync(0xffffffffu, v, o), v);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_part[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v = qm::nan_max(__shfl_down_sync(0xffffffffu, v, o), v);
  __syncthreads();
  return v;
}

// f(i) for every i in [0, n).
template <typename F>
__global__ void for_each_kernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) f(i);
}

template <typename F>
void for_each(int64_t n, F f) {
  for_each_kernel<<<grid_for(n), kThreads, 0, stream()>>>(n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// f() once, on one thread: the scalar epilogue of a reduction (a mean, a shared gradient).
template <typename F>
__global__ void scalar_kernel(F f) { f(); }

template <typename F>
void run_scalar(F f) {
  scalar_kernel<<<1, 1, 0, stream()>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// partial[group * gridDim.x + block] = the double sum of term(group, k) over k in [0, count).
template <typename Term>
__global__ void partial_sum_kernel(int64_t count, Term term, double* partial) {
  double s = 0;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < count; k += int64_t(gridDim.x) * blockDim.x)
    s += static_cast<double>(term(blockIdx.y, k));
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.y * gridDim.x + blockIdx.x] = s;
}

// out[group] = the sum of that group's nb partials, added by one block in a fixed order (deterministic).
__global__ void finish_sum_kernel(const double* partial, int nb, double* out) {
  double s = 0;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) s += partial[blockIdx.x * nb + b];
  s = block_sum(s);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// groups double sums of term(group, k), k in [0, count): a device tensor of shape (groups,).
template <typename Term>
Tensor device_sums(int64_t count, int groups, Term term, const at::TensorOptions& opts) {
  int nb = reduce_grid(count);
  Tensor partial = at::empty({int64_t(groups) * nb}, opts.dtype(at::kDouble));
  Tensor out = at::empty({groups}, opts.dtype(at::kDouble));
  partial_sum_kernel<<<dim3(nb, groups), kThreads, 0, stream()>>>(count, term, partial.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_sum_kernel<<<groups, kThreads, 0, stream()>>>(partial.const_data_ptr<double>(), nb, out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// partial[block] = max |x| over the block's share, NaN-propagating.
template <typename T>
__global__ void amax_abs_kernel(const T* x, int64_t n, float* partial) {
  float m = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    m = qm::nan_max(fabsf(static_cast<float>(x[i])), m);
  m = block_max(m);
  if (threadIdx.x == 0) partial[blockIdx.x] = m;
}

__global__ void finish_max_kernel(const float* partial, int nb, float* out) {
  float m = 0.f;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) m = qm::nan_max(partial[b], m);
  m = block_max(m);
  if (threadIdx.x == 0) *out = m;
}

// max |x| of a dense tensor as a one-element float device tensor (torch.amax semantics).
template <typename T>
Tensor device_amax_abs(const T* x, int64_t n, const at::TensorOptions& opts) {
  int nb = reduce_grid(n);
  Tensor partial = at::empty({nb}, opts.dtype(at::kFloat));
  Tensor out = at::empty({1}, opts.dtype(at::kFloat));
  amax_abs_kernel<<<nb, kThreads, 0, stream()>>>(x, n, partial.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_max_kernel<<<1, kThreads, 0, stream()>>>(partial.const_data_ptr<float>(), nb, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ============================================================================ host checks

void check_dense(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "expcuda_C CUDA kernel: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "expcuda_C: ", name,
              " must be dense (contiguous, channels_last or another dense layout)");
}

void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 32, "expcuda_C: bits must be in [1, 32], got ", bits);
}

// grad in x's storage layout and dtype, so both walk their storage in step.
Tensor like_layout(const Tensor& grad, const Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes(), "expcuda_C: grad shape ", grad.sizes(), " does not match ", x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "expcuda_C: grad dtype does not match x");
  if (grad.strides() == x.strides()) return grad;
  return at::empty_like(x).copy_(grad);
}

// A one-element tensor as a float32 device tensor (the reference's .to(float32).reshape(())).
Tensor device_scalar(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.numel() == 1, "expcuda_C: ", name, " must have one element, got ", t.numel());
  return t.to(like.device(), at::kFloat).contiguous();
}

// ============================================================================ activations

// DoReFa activation: value and STE mask.
struct DorefaActOp {
  float lv;
  __device__ float value(float v) const { return qm::dorefa_act(v, lv); }
  __device__ bool keep(float v) const { return qm::dorefa_act_keep(v); }
};

// sign activation: value and STE mask.
struct SignActOp {
  __device__ float value(float v) const { return qm::sign(v); }
  __device__ bool keep(float v) const { return qm::sign_act_keep(v); }
};

// y = op.value(x); a warp's 32 keep bits (a ballot) are 4 bytes of the packed mask.
template <typename T, typename Op>
__global__ void masked_fwd_kernel(const T* x, T* y, uint8_t* mask, int64_t n, Op op) {
  int lane = threadIdx.x & 31;
  int64_t padded = divup(n, 32) * 32, nbytes = divup(n, 8);  // whole warps stay in the loop
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < padded; i += int64_t(gridDim.x) * blockDim.x) {
    bool keep = false;  // bits past numel stay 0
    if (i < n) {
      float v = static_cast<float>(x[i]);
      y[i] = static_cast<T>(op.value(v));
      keep = op.keep(v);
    }
    unsigned bits = __ballot_sync(0xffffffffu, keep);
    int64_t byte = (i - lane) / 8 + lane;
    if (lane < 4 && byte < nbytes) mask[byte] = static_cast<uint8_t>(bits >> (8 * lane));
  }
}

template <typename Op>
std::tuple<Tensor, Tensor> masked_fwd(const Tensor& x, Op op) {
  int64_t n = x.numel();
  Tensor y = at::empty_like(x);
  Tensor mask = at::empty({divup(n, 8)}, x.options().dtype(at::kByte));
  if (n == 0) return {y, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_fwd", [&] {
    masked_fwd_kernel<<<grid_for(divup(n, 32) * 32), kThreads, 0, stream()>>>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(), n, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mask};
}

std::tuple<Tensor, Tensor> dorefa_activation_fwd(const Tensor& x, int64_t bits) {
  check_dense(x, "x");
  check_bits(bits);
  c10::cuda::CUDAGuard guard(x.device());
  if (bits == 32) {  // no quantization: y = x, every mask bit set (bits past numel stay 0)
    int64_t n = x.numel();
    Tensor mask = at::empty({divup(n, 8)}, x.options().dtype(at::kByte)).fill_(0xFF);
    if (n % 8) mask.narrow(0, n / 8, 1).fill_((1 << (n % 8)) - 1);
    return {x.clone(), mask};
  }
  return masked_fwd(x, DorefaActOp{qm::levels(bits)});
}

std::tuple<Tensor, Tensor> sign_activation_fwd(const Tensor& x) {
  check_dense(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  return masked_fwd(x, SignActOp{});
}

// out = g where bit i of the packed mask is set, else +0.
template <typename T>
struct MaskSelect {
  const T* g;
  const uint8_t* mask;
  T* out;
  __device__ void operator()(int64_t i) const { out[i] = (mask[i >> 3] >> (i & 7)) & 1 ? g[i] : T(0.f); }
};

Tensor mask_bwd(const Tensor& grad, const Tensor& mask) {
  check_dense(grad, "grad");
  int64_t n = grad.numel();
  TORCH_CHECK(mask.is_cuda() && mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.numel() == divup(n, 8),
              "expcuda_C: mask must be a contiguous uint8 CUDA tensor of ceil(numel/8) = ", divup(n, 8), " bytes");
  c10::cuda::CUDAGuard guard(grad.device());
  Tensor dx = at::empty_like(grad);
  if (n == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mask_bwd", [&] {
    for_each(n, MaskSelect<scalar_t>{grad.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(),
                                     dx.mutable_data_ptr<scalar_t>()});
  });
  return dx;
}

// out = g where the DoReFa STE condition holds on x, else +0 (the recompute backward).
template <typename T>
struct RecomputeSelect {
  const T* g;
  const T* x;
  T* out;
  __device__ void operator()(int64_t i) const {
    out[i] = qm::dorefa_act_keep(static_cast<float>(x[i])) ? g[i] : T(0.f);
  }
};

Tensor dorefa_activation_bwd_recompute(const Tensor& grad_in, const Tensor& x, int64_t bits) {
  check_dense(x, "x");
  check_bits(bits);
  c10::cuda::CUDAGuard guard(x.device());
  Tensor grad = like_layout(grad_in, x);
  if (bits == 32) return grad.clone();  // every STE bit is set
  Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dorefa_activation_bwd_recompute", [&] {
    for_each(x.numel(), RecomputeSelect<scalar_t>{grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                  dx.mutable_data_ptr<scalar_t>()});
  });
  return dx;
}

// ============================================================================ DoReFa weights

// |w[i]|, a term of mean|w|.
template <typename T>
struct AbsTerm {
  const T* w;
  __device__ float operator()(int, int64_t i) const { return fabsf(static_cast<float>(w[i])); }
};

// e = float32(sum / n): the mean, rounded once.
struct MeanToFloat {
  const double* sum;
  double n;
  float* out;
  __device__ void operator()() const { *out = static_cast<float>(*sum / n); }
};

// k = 1 forward: sign(w) * E.
template <typename T>
struct DorefaW1 {
  const T* w;
  const float* e;
  T* out;
  __device__ void operator()(int64_t i) const { out[i] = static_cast<T>(qm::dorefa_w1(static_cast<float>(w[i]), *e)); }
};

// k >= 2 forward from t = tanh(w); all zeros when max|t| = 0.
template <typename T>
struct DorefaWk {
  const float* t;
  const float* m;
  float lv;
  T* out;
  __device__ void operator()(int64_t i) const {
    float mv = *m;
    out[i] = static_cast<T>(mv == 0.f ? 0.f : qm::dorefa_wk(t[i], 2.f * mv, lv));
  }
};

Tensor dorefa_weight_fwd(const Tensor& w_in, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(w_in.is_cuda(), "expcuda_C CUDA kernel: w must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(w_in.device());
  Tensor w = w_in.contiguous();
  int64_t n = w.numel();
  Tensor out = at::empty_like(w);
  if (n == 0) return out;
  if (bits == 1) {
    Tensor e = at::empty({1}, w.options().dtype(at::kFloat));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dorefa_weight_fwd", [&] {
      const scalar_t* ws = w.const_data_ptr<scalar_t>();
      Tensor sum = device_sums(n, 1, AbsTerm<scalar_t>{ws}, w.options());
      run_scalar(MeanToFloat{sum.const_data_ptr<double>(), double(n), e.mutable_data_ptr<float>()});
      for_each(n, DorefaW1<scalar_t>{ws, e.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>()});
    });
    return out;
  }
  Tensor t = at::tanh(w.to(at::kFloat)).contiguous();  // ATen's tanh, as the reference
  Tensor m = device_amax_abs(t.const_data_ptr<float>(), n, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dorefa_weight_fwd", [&] {
    for_each(n, DorefaWk<scalar_t>{t.const_data_ptr<float>(), m.const_data_ptr<float>(), qm::levels(bits),
                                   out.mutable_data_ptr<scalar_t>()});
  });
  return out;
}

// Group 0: the terms (2g)(t/d) of S; group 1: the ties |t| == max|t|.
struct DorefaWkTerms {
  const float* g;
  const float* t;
  const float* m;
  __device__ float operator()(int group, int64_t i) const {
    float mv = *m;
    return group == 0 ? qm::dorefa_wk_sum_term(g[i], t[i], 2.f * mv) : static_cast<float>(fabsf(t[i]) == mv);
  }
};

// share = float32(-2 S / d / ties), what each element attaining max|t| gets.
struct DorefaShare {
  const double* sums;
  const float* m;
  float* share;
  __device__ void operator()() const {
    double d = static_cast<double>(2.f * *m);
    *share = static_cast<float>(-2.0 * sums[0] / d / sums[1]);
  }
};

// k >= 2 backward; all zeros when max|t| = 0.
template <typename T>
struct DorefaWkGrad {
  const float* g;
  const float* t;
  const float* m;
  const float* share;
  T* out;
  __device__ void operator()(int64_t i) const {
    float mv = *m;
    float ti = t[i];
    out[i] = static_cast<T>(mv == 0.f ? 0.f : qm::dorefa_wk_grad(g[i], ti, 2.f * mv, fabsf(ti) == mv, *share));
  }
};

Tensor dorefa_weight_bwd(const Tensor& grad, const Tensor& w_in, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(w_in.is_cuda(), "expcuda_C CUDA kernel: w must be a CUDA tensor");
  TORCH_CHECK(grad.sizes() == w_in.sizes(), "expcuda_C: grad shape does not match w");
  c10::cuda::CUDAGuard guard(w_in.device());
  Tensor w = w_in.contiguous();
  if (bits == 1) return at::empty_like(w).copy_(grad);  // sign's STE: the gradient unchanged
  int64_t n = w.numel();
  Tensor out = at::empty_like(w);
  if (n == 0) return out;
  Tensor g = grad.to(at::kFloat).contiguous();
  Tensor t = at::tanh(w.to(at::kFloat)).contiguous();
  Tensor m = device_amax_abs(t.const_data_ptr<float>(), n, w.options());
  const float *gs = g.const_data_ptr<float>(), *ts = t.const_data_ptr<float>(), *ms = m.const_data_ptr<float>();
  Tensor sums = device_sums(n, 2, DorefaWkTerms{gs, ts, ms}, w.options());
  Tensor share = at::empty({1}, w.options().dtype(at::kFloat));
  run_scalar(DorefaShare{sums.const_data_ptr<double>(), ms, share.mutable_data_ptr<float>()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dorefa_weight_bwd", [&] {
    for_each(n, DorefaWkGrad<scalar_t>{gs, ts, ms, share.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>()});
  });
  return out;
}

// ============================================================================ XNOR weights

// One block per output filter: alpha = mean|w| over the filter, then sign(w) * alpha.
template <typename T>
__global__ void xnor_fwd_kernel(const T* w, T* out, int64_t per) {
  __shared__ float alpha;
  const T* wo = w + blockIdx.x * per;
  double s = 0;
  for (int64_t i = threadIdx.x; i < per; i += blockDim.x) s += fabsf(static_cast<float>(wo[i]));
  s = block_sum(s);
  if (threadIdx.x == 0) alpha = static_cast<float>(s / static_cast<double>(per));
  __syncthreads();
  for (int64_t i = threadIdx.x; i < per; i += blockDim.x)
    out[blockIdx.x * per + i] = static_cast<T>(qm::xnor_fwd(static_cast<float>(wo[i]), alpha));
}

// One block per output filter: alpha and T = mean of sign(w) g, then the gradient.
template <typename T>
__global__ void xnor_bwd_kernel(const float* g, const T* w, T* out, int64_t per) {
  __shared__ float alpha, tm;
  const T* wo = w + blockIdx.x * per;
  const float* go = g + blockIdx.x * per;
  double sa = 0, st = 0;
  for (int64_t i = threadIdx.x; i < per; i += blockDim.x) {
    float wi = static_cast<float>(wo[i]);
    sa += fabsf(wi);
    st += qm::xnor_sum_term(go[i], wi);
  }
  sa = block_sum(sa);
  st = block_sum(st);
  if (threadIdx.x == 0) {
    alpha = static_cast<float>(sa / static_cast<double>(per));
    tm = static_cast<float>(st / static_cast<double>(per));
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < per; i += blockDim.x)
    out[blockIdx.x * per + i] = static_cast<T>(qm::xnor_grad(go[i], static_cast<float>(wo[i]), alpha, tm));
}

// Output filters and elements per filter of a rank >= 2 weight (0 per filter when it has none:
// an empty weight, which the callers return at once).
std::pair<int64_t, int64_t> filters(const Tensor& w) {
  TORCH_CHECK(w.dim() >= 2, "expcuda_C: XNOR weights need rank >= 2 (out, in, ...), got rank ", w.dim());
  const int64_t filt = w.size(0);
  return {filt, filt == 0 ? 0 : w.numel() / filt};
}

Tensor xnor_weight_fwd(const Tensor& w_in) {
  TORCH_CHECK(w_in.is_cuda(), "expcuda_C CUDA kernel: w must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(w_in.device());
  Tensor w = w_in.contiguous();
  auto [filt, per] = filters(w);
  Tensor out = at::empty_like(w);
  if (w.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "xnor_weight_fwd", [&] {
    xnor_fwd_kernel<<<filt, kThreads, 0, stream()>>>(w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), per);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor xnor_weight_bwd(const Tensor& grad, const Tensor& w_in) {
  TORCH_CHECK(w_in.is_cuda(), "expcuda_C CUDA kernel: w must be a CUDA tensor");
  TORCH_CHECK(grad.sizes() == w_in.sizes(), "expcuda_C: grad shape does not match w");
  c10::cuda::CUDAGuard guard(w_in.device());
  Tensor w = w_in.contiguous();
  auto [filt, per] = filters(w);
  Tensor out = at::empty_like(w);
  if (w.numel() == 0) return out;
  Tensor g = grad.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "xnor_weight_bwd", [&] {
    xnor_bwd_kernel<<<filt, kThreads, 0, stream()>>>(g.const_data_ptr<float>(), w.const_data_ptr<scalar_t>(),
                                                     out.mutable_data_ptr<scalar_t>(), per);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ============================================================================ SYQ weights

// How the scales broadcast over a weight seen as (outer, P) with P kernel positions (1 for
// "layer"): position p uses scale p / run (run = kw for "row", 1 otherwise); the elements of
// group j are, for every outer index, the run positions starting at j * run.
struct SyqLayout {
  int64_t positions, run, groups;
};

SyqLayout syq_layout(const Tensor& w, const Tensor& scales, int64_t granularity) {
  TORCH_CHECK(granularity >= kLayer && granularity <= kPixel, "expcuda_C: granularity must be 0 (layer), 1 (row) or 2 (pixel)");
  if (granularity == kLayer) {
    TORCH_CHECK(scales.numel() == 1, "expcuda_C: layer granularity needs one scale, got ", scales.numel());
    return {1, 1, 1};
  }
  TORCH_CHECK(w.dim() == 4, "expcuda_C: row/pixel granularity needs a (out, in, kh, kw) weight, got rank ", w.dim());
  int64_t kh = w.size(2), kw = w.size(3);
  SyqLayout lay = granularity == kRow ? SyqLayout{kh * kw, kw, kh} : SyqLayout{kh * kw, 1, kh * kw};
  TORCH_CHECK(scales.numel() == lay.groups, "expcuda_C: ", granularity == kRow ? "row" : "pixel",
              " granularity needs ", lay.groups, " scales, got ", scales.numel());
  return lay;
}

// forward: (sign(w) * [|w| > thr]) * scale, thr = float32(eta) * max|w|.
template <typename T>
struct SyqFwd {
  const T* w;
  const float* scales;
  const float* m;
  float eta;
  int64_t positions, run;
  T* out;
  __device__ void operator()(int64_t i) const {
    float scale = scales[(i % positions) / run];
    out[i] = static_cast<T>(qm::syq_fwd(static_cast<float>(w[i]), eta * *m, scale));
  }
};

// backward dw: scale * g.
template <typename T>
struct SyqDw {
  const float* g;
  const float* scales;
  int64_t positions, run;
  T* out;
  __device__ void operator()(int64_t i) const { out[i] = static_cast<T>(qm::syq_dw(g[i], scales[(i % positions) / run])); }
};

// backward dalpha terms: element k of group j, mapped to its storage index.
template <typename T>
struct SyqTerm {
  const float* g;
  const T* w;
  const float* m;
  float eta;
  int64_t positions, run;
  __device__ float operator()(int group, int64_t k) const {
    int64_t i = (k / run) * positions + group * run + k % run;
    return qm::syq_sum_term(g[i], static_cast<float>(w[i]), eta * *m);
  }
};

Tensor syq_weight_fwd(const Tensor& w_in, const Tensor& scales, double eta, int64_t granularity) {
  TORCH_CHECK(w_in.is_cuda(), "expcuda_C CUDA kernel: w must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(w_in.device());
  Tensor w = w_in.contiguous();
  SyqLayout lay = syq_layout(w, scales, granularity);
  Tensor out = at::empty_like(w);
  if (w.numel() == 0) return out;
  Tensor sc = scales.to(w.device(), at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "syq_weight_fwd", [&] {
    const scalar_t* ws = w.const_data_ptr<scalar_t>();
    Tensor m = device_amax_abs(ws, w.numel(), w.options());
    for_each(w.numel(), SyqFwd<scalar_t>{ws, sc.const_data_ptr<float>(), m.const_data_ptr<float>(), static_cast<float>(eta),
                                         lay.positions, lay.run, out.mutable_data_ptr<scalar_t>()});
  });
  return out;
}

std::tuple<Tensor, Tensor> syq_weight_bwd(const Tensor& grad, const Tensor& w_in, const Tensor& scales,
                                          double eta, int64_t granularity) {
  TORCH_CHECK(w_in.is_cuda(), "expcuda_C CUDA kernel: w must be a CUDA tensor");
  TORCH_CHECK(grad.sizes() == w_in.sizes(), "expcuda_C: grad shape does not match w");
  c10::cuda::CUDAGuard guard(w_in.device());
  Tensor w = w_in.contiguous();
  SyqLayout lay = syq_layout(w, scales, granularity);
  Tensor dw = at::empty_like(w);
  int64_t n = w.numel();
  if (n == 0) return {dw, at::zeros_like(scales)};
  Tensor g = grad.to(at::kFloat).contiguous();
  Tensor sc = scales.to(w.device(), at::kFloat).contiguous();
  Tensor ds;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "syq_weight_bwd", [&] {
    const scalar_t* ws = w.const_data_ptr<scalar_t>();
    const float* gs = g.const_data_ptr<float>();
    for_each(n, SyqDw<scalar_t>{gs, sc.const_data_ptr<float>(), lay.positions, lay.run, dw.mutable_data_ptr<scalar_t>()});
    Tensor m = device_amax_abs(ws, n, w.options());
    int64_t per_group = n / lay.positions * lay.run;
    ds = device_sums(per_group, static_cast<int>(lay.groups),
                     SyqTerm<scalar_t>{gs, ws, m.const_data_ptr<float>(), static_cast<float>(eta), lay.positions, lay.run},
                     w.options());
  });
  // double -> float32 -> the scales' dtype: casts only, rounding to nearest even
  return {dw, ds.to(at::kFloat).to(scales.scalar_type()).view(scales.sizes())};
}

// ============================================================================ LSQ

// The clipping range (Qn, Qp) of reference.lsq_range.
std::pair<float, float> lsq_range(int64_t bits, bool is_signed) {
  check_bits(bits);
  if (is_signed) return {-static_cast<float>(std::ldexp(1.0, static_cast<int>(bits) - 1)), qm::levels(bits - 1)};
  return {0.f, qm::levels(bits)};
}

// forward: round(clamp(x / s, Qn, Qp)) * s.
template <typename T>
struct LsqFwd {
  const T* x;
  const float* s;
  float qn, qp;
  T* out;
  __device__ void operator()(int64_t i) const { out[i] = static_cast<T>(qm::lsq_fwd(static_cast<float>(x[i]), *s, qn, qp)); }
};

Tensor lsq_fwd(const Tensor& x, const Tensor& step, int64_t bits, bool is_signed) {
  check_dense(x, "x");
  auto [qn, qp] = lsq_range(bits, is_signed);
  c10::cuda::CUDAGuard guard(x.device());
  Tensor s = device_scalar(step, x, "step");
  Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lsq_fwd", [&] {
    for_each(x.numel(), LsqFwd<scalar_t>{x.const_data_ptr<scalar_t>(), s.const_data_ptr<float>(), qn, qp,
                                         y.mutable_data_ptr<scalar_t>()});
  });
  return y;
}

// backward: dx = g inside the range, and the term g * r of the step gradient.
template <typename T>
struct LsqBwdTerm {
  const T* x;
  const T* g;
  const float* s;
  float qn, qp;
  T* dx;
  __device__ float operator()(int, int64_t i) const {
    float v = static_cast<float>(x[i]) / *s;
    float gf = static_cast<float>(g[i]);
    dx[i] = static_cast<T>(qm::lsq_keep(v, qn, qp) ? gf : 0.f);
    return gf * qm::lsq_r(v, qn, qp);
  }
};

// ds = float32(total / sqrt(numel * Qp)).
struct LsqStepGrad {
  const double* total;
  int64_t numel;
  float qp;
  float* out;
  __device__ void operator()() const { *out = qm::lsq_step_grad(*total, numel, qp); }
};

std::tuple<Tensor, Tensor> lsq_bwd(const Tensor& grad_in, const Tensor& x, const Tensor& step,
                                   int64_t bits, bool is_signed) {
  check_dense(x, "x");
  auto [qn, qp] = lsq_range(bits, is_signed);
  c10::cuda::CUDAGuard guard(x.device());
  Tensor s = device_scalar(step, x, "step");
  Tensor grad = like_layout(grad_in, x);
  Tensor dx = at::empty_like(x);
  Tensor ds = at::empty({1}, x.options().dtype(at::kFloat));
  int64_t n = x.numel();
  if (n == 0) return {dx, at::zeros_like(step)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lsq_bwd", [&] {
    Tensor total = device_sums(n, 1,
                               LsqBwdTerm<scalar_t>{x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                                    s.const_data_ptr<float>(), qn, qp, dx.mutable_data_ptr<scalar_t>()},
                               x.options());
    run_scalar(LsqStepGrad{total.const_data_ptr<double>(), n, qp, ds.mutable_data_ptr<float>()});
  });
  return {dx, ds.to(step.device(), step.scalar_type()).view(step.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(expcuda_C, CUDA, m) {
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
