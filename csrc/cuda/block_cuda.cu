// The fused epilogue of the expanded block on CUDA: the CUDA implementations of the
// expcuda_C::block_epilogue_fwd / block_epilogue_bwd schemas that csrc/cpu/block_cpu.cpp
// defines (expcuda/nn/epilogue.py documents the op; the codes are the same).
//
// z (N, C, H, W) holds the stacked convolution output: channels [0, c_lp) the low-precision
// branch, [c_lp, C) the full-precision branch (none when C == c_lp).  NCHW-contiguous or
// channels_last, indexed in place (other strides are copied to NCHW); the output and the
// gradients have z's layout.  Storage float32,
// float16 or bfloat16; every computation is float32 (sums in double), as in the reference.
//
// Forward: (1) per-channel partial sums of d = z - shift and d^2 in double over (N, H, W),
// a grid of (channel, slice) blocks; (2) one thread per channel adds its partials in a fixed
// order and writes mean, var and the normalization constants; (3) one elementwise pass over
// the output normalizes, applies phi and Qa (LP), psi and f (FP) and combines.
// Backward: (1) per output channel partial sums of dy and dy * xhat for its LP and FP channel
// (and of LSQ's step-gradient terms); (2) one thread per output channel finishes them into
// BatchNorm's backward coefficients, dweight and dbias; (3) one elementwise pass recomputes dy
// and writes dz.  The intermediate values are recomputed from z, never stored.
//
// The per-element arithmetic repeats block_cpu.cpp (and epilogue_fwd_torch /
// epilogue_bwd_torch) operation for operation; the build passes --fmad=false and uses IEEE
// division and square root.  No atomics: results are deterministic run to run.  Everything is
// enqueued on the current stream and nothing synchronizes the host (f and the LSQ step are
// read on the device).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/codes.h"
#include "common/epilogue_math.h"
#include "common/quant_math.h"

namespace expcuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;  // threads per block, every launch below (block sums rely on it)
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 8192;  // cap of grid-stride elementwise grids
constexpr int64_t kMaxPartials = 64;  // blocks per channel in the reductions

// Combine, AQuant and Phi: common/codes.h, generated from expcuda/codes.py

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// Blocks of a grid-stride loop over n items.
int grid_for(int64_t n) { return static_cast<int>(std::clamp<int64_t>(divup(n, kThreads), 1, kMaxBlocks)); }

// Blocks of one thread per item.
int blocks_for(int64_t n) { return static_cast<int>(std::max<int64_t>(divup(n, kThreads), 1)); }

// Slices per channel of a reduction over count elements: a function of count alone, so the
// summation order (and so every result) does not depend on the GPU.
int partial_blocks(int64_t count) {
  return static_cast<int>(std::clamp<int64_t>(divup(count, int64_t(kThreads) * 8), 1, kMaxPartials));
}

// q = x / d, r = x % d; in 32 bits when every x (and d) fits, decided once per launch.
struct Divider {
  int64_t d;
  bool narrow;
  __device__ __forceinline__ void divmod(int64_t x, int64_t& q, int64_t& r) const {
    if (narrow) {
      const uint32_t xx = static_cast<uint32_t>(x), dd = static_cast<uint32_t>(d);
      const uint32_t qq = xx / dd;
      q = qq;
      r = xx - qq * dd;
    } else {
      q = x / d;
      r = x - q * d;
    }
  }
};

Divider make_div(int64_t d, int64_t max_x) {
  return Divider{d, max_x <= int64_t(UINT32_MAX) && d <= int64_t(UINT32_MAX)};
}

// The op's configuration, passed to every kernel by value.
struct Cfg {
  int64_t n, c_tot, c_lp, c_out, hw;
  int scheme, combine, aq, phi, psi, bits;
  bool cl;            // z, the output and their gradients are channels_last (else NCHW-contiguous)
  float levels;       // DoReFa's n, LSQ's Qp
  const float* f;     // the factor f, a float32 scalar on the device
  const float* step;  // LSQ's step on the device, nullptr otherwise
};

// Per channel: y = ((z - mean) * invstd) * w + b, as the reference orders it.
struct Chan {
  float mean, invstd, w, b;
};

// Per channel: dz = scale * ((dy - a) - xhat * b), BatchNorm's backward.
struct Coef {
  float scale, a, b, pad;
};

// ============================================================================ device math

// Sums of K doubles over the block (blockDim.x == kThreads); the result is valid in thread 0.
template <int K>
__device__ __forceinline__ void block_sum_n(double (&v)[K]) {
  __shared__ double part[K][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < K; ++q)
    for (int o = 16; o > 0; o >>= 1) v[q] += __shfl_down_sync(0xffffffffu, v[q], o);
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < K; ++q) part[q][warp] = v[q];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int q = 0; q < K; ++q) {
      double x = lane < kWarps ? part[q][lane] : 0.0;
      for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
      v[q] = x;
    }
  }
}

// P[ch] by value, zeros for an absent channel (ch < 0).
__device__ __forceinline__ Chan chan_at(const Chan* P, int64_t ch) {
  if (ch >= 0) return P[ch];
  return Chan{0.f, 0.f, 0.f, 0.f};
}

__device__ __forceinline__ Chan make_chan(float mean, float var, float w, float b, float eps) {
  return Chan{mean, 1.f / sqrtf(var + eps), w, b};  // epilogue.invstd: IEEE sqrt, IEEE division
}

// The per-element math (BatchNorm, phi, the combine, Qa and its STE): common/epilogue_math.h.
__device__ __forceinline__ void sources(const Cfg& c, int64_t co, int64_t& c1, int64_t& c2) {
  em::sources(c.c_tot != c.c_lp, c.combine, c.c_lp, co, c1, c2);
}

__device__ __forceinline__ float qa_fwd(const Cfg& c, float u, float s) { return em::qa(c.aq, c.bits, c.levels, s, u); }

__device__ __forceinline__ float qa_grad(const Cfg& c, float u, float g, float s, float& ds) {
  return em::qa_grad(c.aq, c.levels, s, u, g, ds);
}

// The storage index of element (i, ch, k) (k = y * W + x) of a tensor with `channels` channels.
__device__ __forceinline__ int64_t at_(const Cfg& c, int64_t i, int64_t ch, int64_t k, int64_t channels) {
  return c.cl ? (i * c.hw + k) * channels + ch : (i * channels + ch) * c.hw + k;
}

// (i, co, k) of the output element at storage index idx.
__device__ __forceinline__ void locate(const Cfg& c, const Divider& by_hw, const Divider& by_cout, int64_t idx,
                                       int64_t& i, int64_t& co, int64_t& k) {
  int64_t r;
  if (c.cl) {
    by_cout.divmod(idx, r, co);
    by_hw.divmod(r, i, k);
  } else {
    by_hw.divmod(idx, r, k);
    by_cout.divmod(r, i, co);
  }
}

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// One output element's forward from its LP value z1 (if has1) and FP value z2 (if has2).
__device__ __forceinline__ float forward_value(const Cfg& c, const Chan& p1, const Chan& p2, bool has1,
                                               bool has2, float z1, float z2, float f, float s) {
  float u = 0.f, v = 0.f;
  if (has1) u = em::phi(c.phi, em::bn(z1, p1.mean, p1.invstd, p1.w, p1.b));
  if (has2) v = em::phi(c.psi, em::bn(z2, p2.mean, p2.invstd, p2.w, p2.b)) * f;
  if (!has2) return qa_fwd(c, u, s);
  if (!has1) return c.scheme == 2 ? v : qa_fwd(c, v, s);  // a concat FP channel
  if (c.scheme == 2) return em::combine(c.combine, qa_fwd(c, u, s), v);
  return qa_fwd(c, em::combine(c.combine, u, v), s);
}

// One output element's backward down to BatchNorm's output: dy of its LP channel (d1) and
// FP channel (d2), their xhat (x1, x2) and LSQ's step-gradient term (ds).
struct Dy {
  float d1, d2, x1, x2, ds;
};

__device__ __forceinline__ Dy backward_value(const Cfg& c, const Chan& p1, const Chan& p2, bool has1,
                                             bool has2, float z1, float z2, float g, float f,
                                             float s) {
  Dy r{0.f, 0.f, 0.f, 0.f, 0.f};
  float y1 = 0.f, y2 = 0.f, u = 0.f, v = 0.f;
  if (has1) {
    r.x1 = em::xhat(z1, p1.mean, p1.invstd);
    y1 = r.x1 * p1.w + p1.b;
    u = em::phi(c.phi, y1);
  }
  if (has2) {
    r.x2 = em::xhat(z2, p2.mean, p2.invstd);
    y2 = r.x2 * p2.w + p2.b;
    if (c.scheme == 1) v = em::phi(c.psi, y2) * f;  // Qa sees psi(y2) * f
  }
  float gu = g, gv = g;  // the gradient reaching u (LP) and psi(y2) before f (FP)
  bool negate = false;
  if (!has2) {
    gu = qa_grad(c, u, g, s, r.ds);
  } else if (!has1) {
    if (c.scheme == 1) gv = qa_grad(c, v, g, s, r.ds);
  } else if (c.scheme == 2) {
    gu = qa_grad(c, u, g, s, r.ds);
    negate = c.combine == kSub;
  } else {
    gu = gv = qa_grad(c, em::combine(c.combine, u, v), g, s, r.ds);
    negate = c.combine == kSub;
  }
  if (has1) r.d1 = em::phi_keep(c.phi, y1) ? gu : 0.f;
  if (has2) r.d2 = em::phi_keep(c.psi, y2) ? gv * (negate ? -f : f) : 0.f;
  return r;
}

// ============================================================================ kernels

// partial[(ch * nb + slice) * 2 + {0, 1}] = sums of d and d^2, d = z - shift over the slice's
// share of channel ch; shift = the channel's first element keeps the cancellation small.
template <typename T>
__global__ void __launch_bounds__(kThreads)
stats_partial_kernel(const T* __restrict__ z, Cfg c, Divider by_hw, double* __restrict__ partial) {
  const int64_t ch = blockIdx.x, nb = gridDim.y, count = c.n * c.hw;
  const double shift = count > 0 ? static_cast<double>(load(z, at_(c, 0, ch, 0, c.c_tot))) : 0.0;
  double acc[2] = {0.0, 0.0};
  for (int64_t j = int64_t(blockIdx.y) * kThreads + threadIdx.x; j < count; j += nb * kThreads) {
    int64_t i, k;
    by_hw.divmod(j, i, k);
    const double d = static_cast<double>(load(z, at_(c, i, ch, k, c.c_tot))) - shift;
    acc[0] += d;
    acc[1] += d * d;
  }
  block_sum_n<2>(acc);
  if (threadIdx.x == 0) {
    partial[(ch * nb + blockIdx.y) * 2] = acc[0];
    partial[(ch * nb + blockIdx.y) * 2 + 1] = acc[1];
  }
}

// One thread per channel: mean, biased variance and the normalization constants.
template <typename T>
__global__ void __launch_bounds__(kThreads)
stats_finish_kernel(const T* __restrict__ z, const double* __restrict__ partial, int nb, Cfg c,
                    float eps, const float* __restrict__ w, const float* __restrict__ b,
                    float* __restrict__ mean, float* __restrict__ var, Chan* __restrict__ P) {
  const int64_t ch = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ch >= c.c_tot) return;
  const int64_t count = c.n * c.hw;
  double s = 0.0, ss = 0.0;
  for (int j = 0; j < nb; ++j) {
    s += partial[(ch * nb + j) * 2];
    ss += partial[(ch * nb + j) * 2 + 1];
  }
  const double shift = count > 0 ? static_cast<double>(load(z, ch * c.hw)) : 0.0;
  const double dmean = s / static_cast<double>(count);  // NaN for an empty batch, like torch
  const double dvar = ss / static_cast<double>(count) - dmean * dmean;
  const float m = static_cast<float>(shift + dmean);
  const float v = static_cast<float>(dvar < 0.0 ? 0.0 : dvar);
  mean[ch] = m;
  var[ch] = v;
  P[ch] = make_chan(m, v, w[ch], b[ch], eps);
}

// One thread per channel: the normalization constants from given statistics (backward).
__global__ void __launch_bounds__(kThreads)
chan_kernel(const float* __restrict__ mean, const float* __restrict__ var, const float* __restrict__ w,
            const float* __restrict__ b, float eps, int64_t channels, Chan* __restrict__ P) {
  const int64_t ch = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ch < channels) P[ch] = make_chan(mean[ch], var[ch], w[ch], b[ch], eps);
}

// out[idx], idx = (i * c_out + co) * hw + k, over every output element.
template <typename T>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ z, const Chan* __restrict__ P, Cfg c, Divider by_hw,
               Divider by_cout, T* __restrict__ out, int64_t total) {
  const float f = *c.f;
  const float s = c.aq == kLsq ? *c.step : 1.f;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    int64_t k, i, co, c1, c2;
    locate(c, by_hw, by_cout, idx, i, co, k);
    sources(c, co, c1, c2);
    const bool has1 = c1 >= 0, has2 = c2 >= 0;
    const float z1 = has1 ? load(z, at_(c, i, c1, k, c.c_tot)) : 0.f;
    const float z2 = has2 ? load(z, at_(c, i, c2, k, c.c_tot)) : 0.f;
    out[idx] = static_cast<T>(
        forward_value(c, chan_at(P, c1), chan_at(P, c2), has1, has2, z1, z2, f, s));
  }
}

// Backward pass 1.  Block (co, slice): partial[(co * nb + slice) * 5 + q] = the slice's sums of
// q = 0: dy1, 1: dy1 * xhat1, 2: dy2, 3: dy2 * xhat2, 4: LSQ's step-gradient terms, for
// output channel co's LP channel (1) and FP channel (2).
template <typename T>
__global__ void __launch_bounds__(kThreads)
bwd_sums_kernel(const T* __restrict__ z, const T* __restrict__ grad, const Chan* __restrict__ P,
                Cfg c, Divider by_hw, double* __restrict__ partial) {
  const int64_t co = blockIdx.x, nb = gridDim.y, count = c.n * c.hw;
  int64_t c1, c2;
  sources(c, co, c1, c2);
  const bool has1 = c1 >= 0, has2 = c2 >= 0;
  const Chan p1 = chan_at(P, c1), p2 = chan_at(P, c2);
  const float f = *c.f;
  const float s = c.aq == kLsq ? *c.step : 1.f;
  double acc[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t j = int64_t(blockIdx.y) * kThreads + threadIdx.x; j < count; j += nb * kThreads) {
    int64_t i, k;
    by_hw.divmod(j, i, k);
    const float g = load(grad, at_(c, i, co, k, c.c_out));
    const float z1 = has1 ? load(z, at_(c, i, c1, k, c.c_tot)) : 0.f;
    const float z2 = has2 ? load(z, at_(c, i, c2, k, c.c_tot)) : 0.f;
    const Dy d = backward_value(c, p1, p2, has1, has2, z1, z2, g, f, s);
    acc[0] += static_cast<double>(d.d1);
    acc[1] += static_cast<double>(d.d1 * d.x1);
    acc[2] += static_cast<double>(d.d2);
    acc[3] += static_cast<double>(d.d2 * d.x2);
    acc[4] += static_cast<double>(d.ds);
  }
  block_sum_n<5>(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int q = 0; q < 5; ++q) partial[(co * nb + blockIdx.y) * 5 + q] = acc[q];
  }
}

__device__ __forceinline__ void finish_channel(int64_t ch, double sg, double sgx, const Chan* P,
                                               double count, Coef* K, float* dw, float* db) {
  const Chan p = P[ch];
  // as block_cpu.cpp: the float sums, divided in double, rounded to float
  K[ch] = Coef{p.w * p.invstd, static_cast<float>(static_cast<double>(static_cast<float>(sg)) / count),
               static_cast<float>(static_cast<double>(static_cast<float>(sgx)) / count), 0.f};
  dw[ch] = static_cast<float>(sgx);
  db[ch] = static_cast<float>(sg);
}

// Backward pass 1, finished: one thread per output channel adds its partials in a fixed order.
__global__ void __launch_bounds__(kThreads)
bwd_finish_kernel(const double* __restrict__ partial, int nb, const Chan* __restrict__ P, Cfg c,
                  Coef* __restrict__ K, float* __restrict__ dw, float* __restrict__ db,
                  double* __restrict__ ds_part) {
  const int64_t co = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (co >= c.c_out) return;
  double acc[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int j = 0; j < nb; ++j) {
#pragma unroll
    for (int q = 0; q < 5; ++q) acc[q] += partial[(co * nb + j) * 5 + q];
  }
  int64_t c1, c2;
  sources(c, co, c1, c2);
  const double count = static_cast<double>(c.n * c.hw);
  if (c1 >= 0) finish_channel(c1, acc[0], acc[1], P, count, K, dw, db);
  if (c2 >= 0) finish_channel(c2, acc[2], acc[3], P, count, K, dw, db);
  ds_part[co] = acc[4];
}

// LSQ's step gradient: one block adds the output channels' terms.
__global__ void __launch_bounds__(kThreads)
dstep_kernel(const double* __restrict__ ds_part, int64_t c_out, int64_t numel, float qp,
             float* __restrict__ dstep) {
  double t[1] = {0.0};
  for (int64_t co = threadIdx.x; co < c_out; co += kThreads) t[0] += ds_part[co];
  block_sum_n<1>(t);
  if (threadIdx.x == 0) *dstep = qm::lsq_step_grad(t[0], numel, qp);
}

// Backward pass 2: for every output element, dy recomputed, dz of its LP and FP channel.
template <typename T>
__global__ void __launch_bounds__(kThreads)
dz_kernel(const T* __restrict__ z, const T* __restrict__ grad, const Chan* __restrict__ P,
          const Coef* __restrict__ K, Cfg c, Divider by_hw, Divider by_cout, T* __restrict__ dz,
          int64_t total) {
  const float f = *c.f;
  const float s = c.aq == kLsq ? *c.step : 1.f;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    int64_t k, i, co, c1, c2;
    locate(c, by_hw, by_cout, idx, i, co, k);
    sources(c, co, c1, c2);
    const bool has1 = c1 >= 0, has2 = c2 >= 0;
    const int64_t o1 = at_(c, i, c1, k, c.c_tot), o2 = at_(c, i, c2, k, c.c_tot);
    const float z1 = has1 ? load(z, o1) : 0.f;
    const float z2 = has2 ? load(z, o2) : 0.f;
    const Dy d = backward_value(c, chan_at(P, c1), chan_at(P, c2), has1, has2, z1, z2,
                                load(grad, idx), f, s);
    if (has1) {
      const Coef k1 = K[c1];
      dz[o1] = static_cast<T>(k1.scale * ((d.d1 - k1.a) - d.x1 * k1.b));
    }
    if (has2) {
      const Coef k2 = K[c2];
      dz[o2] = static_cast<T>(k2.scale * ((d.d2 - k2.a) - d.x2 * k2.b));
    }
  }
}

// ============================================================================ host side

// fn(T{}) with T the storage type of z: float, at::Half or at::BFloat16.
template <typename Fn>
void dispatch(at::ScalarType st, const char* op, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": z must be float32, float16 or bfloat16, got ", st);
  }
}

// A tensor the kernels read, on z's device.
void check_device(const char* op, const Tensor& t, const char* name, const Tensor& z) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda() && t.device() == z.device(), op, ": ", name, " must be a CUDA tensor on ",
              z.device(), " like z, got one on ", t.device());
}

// A per-channel vector (weight, bias, mean, var) as contiguous float32.
Tensor per_channel(const char* op, const Tensor& t, const char* name, const Tensor& z, int64_t channels) {
  check_device(op, t, name, z);
  TORCH_CHECK(t.numel() == channels, op, ": ", name, " must have ", channels,
              " elements (one per channel of z), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// A one-element tensor (f, step) as a float32 scalar on z's device; CPU scalars are copied.
Tensor device_scalar(const char* op, const Tensor& t, const char* name, const Tensor& z) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have one element, got shape ", t.sizes());
  TORCH_CHECK(t.is_cpu() || (t.is_cuda() && t.device() == z.device()), op, ": ", name,
              " must be on ", z.device(), " (or a CPU scalar), got one on ", t.device());
  return t.to(z.device(), at::kFloat).contiguous();
}

// Whether the kernels index t as channels_last (an NCHW-contiguous tensor, H = W = 1 included, is not).
bool channels_last(const Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// t as the kernels read it: as it is when NCHW-contiguous or channels_last, else an NCHW copy.
Tensor kernel_layout(const Tensor& t) { return channels_last(t) ? t : t.contiguous(); }

at::MemoryFormat format_of(const Cfg& c) {
  return c.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_z(const char* op, const Tensor& z) {
  TORCH_CHECK(z.defined() && z.is_cuda(), op, ": z must be a CUDA tensor");
  TORCH_CHECK(z.dim() == 4, op, ": z must be (N, C, H, W), got shape ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kHalf ||
                  z.scalar_type() == at::kBFloat16,
              op, ": z must be float32, float16 or bfloat16, got ", z.scalar_type());
}

// Checks the arguments and fills the configuration; f_dev and step_dev keep the device scalars
// the configuration points to alive.
Cfg make_cfg(const char* op, const Tensor& z, const Tensor& f, const c10::optional<Tensor>& step,
             int64_t c_lp, int64_t scheme, int64_t combine, int64_t a_quant, int64_t a_bits,
             int64_t phi, int64_t psi, Tensor& f_dev, Tensor& step_dev) {
  Cfg c;
  c.n = z.size(0);
  c.c_tot = z.size(1);
  c.hw = z.size(2) * z.size(3);
  TORCH_CHECK(c_lp > 0 && c_lp <= c.c_tot, op, ": c_lp must be in [1, ", c.c_tot,
              "] (z's channel count), got ", c_lp);
  TORCH_CHECK(scheme == 1 || scheme == 2, op, ": scheme must be 1 or 2, got ", scheme);
  TORCH_CHECK(combine >= kAdd && combine <= kConcat, op,
              ": combine must be 0 (add), 1 (sub) or 2 (concat), got ", combine);
  TORCH_CHECK(a_quant >= kNone && a_quant <= kLsq, op,
              ": a_quant must be 0 (none), 1 (dorefa), 2 (sign) or 3 (lsq), got ", a_quant);
  TORCH_CHECK(phi >= kIdentity && phi <= kClip, op,
              ": phi must be 0 (identity), 1 (relu) or 2 (clip), got ", phi);
  TORCH_CHECK(psi >= kIdentity && psi <= kClip, op,
              ": psi must be 0 (identity), 1 (relu) or 2 (clip), got ", psi);
  if (a_quant == kDorefa || a_quant == kLsq)
    TORCH_CHECK(a_bits >= 1 && a_bits <= 32, op, ": a_bits must be in [1, 32], got ", a_bits);
  const bool fp = c.c_tot > c_lp;
  TORCH_CHECK(!fp || combine == kConcat || c.c_tot == 2 * c_lp, op,
              ": add/sub need as many FP channels as LP channels: z has ", c.c_tot,
              " channels, c_lp is ", c_lp);
  c.c_lp = c_lp;
  c.c_out = (!fp || combine == kConcat) ? c.c_tot : c_lp;
  c.scheme = static_cast<int>(scheme);
  c.combine = static_cast<int>(combine);
  c.aq = static_cast<int>(a_quant);
  c.phi = static_cast<int>(phi);
  c.psi = static_cast<int>(psi);
  c.bits = static_cast<int>(a_bits);
  c.levels = a_bits == 32 ? 1.f : qm::levels(a_bits);
  c.cl = channels_last(z);
  f_dev = device_scalar(op, f, "f", z);
  c.f = f_dev.const_data_ptr<float>();
  c.step = nullptr;
  if (a_quant == kLsq) {
    TORCH_CHECK(step.has_value() && step->defined(), op, ": a_quant lsq needs its step");
    step_dev = device_scalar(op, *step, "step", z);
    c.step = step_dev.const_data_ptr<float>();
  }
  return c;
}

std::tuple<Tensor, Tensor, Tensor> block_epilogue_fwd_cuda(
    const Tensor& z_in, const Tensor& weight, const Tensor& bias, const Tensor& f,
    const c10::optional<Tensor>& step, int64_t c_lp, double eps, int64_t scheme, int64_t combine,
    int64_t a_quant, int64_t a_bits, int64_t phi, int64_t psi) {
  const char* op = "block_epilogue_fwd (CUDA)";
  check_z(op, z_in);
  c10::cuda::CUDAGuard guard(z_in.device());
  const Tensor z = kernel_layout(z_in);
  Tensor f_dev, step_dev;
  const Cfg c = make_cfg(op, z, f, step, c_lp, scheme, combine, a_quant, a_bits, phi, psi, f_dev, step_dev);
  const Tensor w = per_channel(op, weight, "weight", z, c.c_tot);
  const Tensor b = per_channel(op, bias, "bias", z, c.c_tot);

  const auto fopts = z.options().dtype(at::kFloat);
  Tensor mean = at::empty({c.c_tot}, fopts);
  Tensor var = at::empty({c.c_tot}, fopts);
  Tensor chans = at::empty({c.c_tot, 4}, fopts);
  Tensor out = at::empty({c.n, c.c_out, z.size(2), z.size(3)}, z.options().memory_format(format_of(c)));
  const int64_t count = c.n * c.hw, total = out.numel();
  const int nb = partial_blocks(count);
  Tensor partial = at::empty({c.c_tot * nb * 2}, z.options().dtype(at::kDouble));
  Chan* P = reinterpret_cast<Chan*>(chans.mutable_data_ptr<float>());

  dispatch(z.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* zp = z.const_data_ptr<T>();
    stats_partial_kernel<T><<<dim3(static_cast<unsigned>(c.c_tot), nb), kThreads, 0, stream()>>>(
        zp, c, make_div(c.hw, count), partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_finish_kernel<T><<<blocks_for(c.c_tot), kThreads, 0, stream()>>>(
        zp, partial.const_data_ptr<double>(), nb, c, static_cast<float>(eps), w.const_data_ptr<float>(),
        b.const_data_ptr<float>(), mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(), P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (total > 0) {
      forward_kernel<T><<<grid_for(total), kThreads, 0, stream()>>>(
          zp, P, c, make_div(c.hw, total), make_div(c.c_out, total), out.mutable_data_ptr<T>(), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> block_epilogue_bwd_cuda(
    const Tensor& grad_in, const Tensor& z_in, const Tensor& weight, const Tensor& bias,
    const Tensor& f, const c10::optional<Tensor>& step, const Tensor& mean, const Tensor& var,
    int64_t c_lp, double eps, int64_t scheme, int64_t combine, int64_t a_quant, int64_t a_bits,
    int64_t phi, int64_t psi) {
  const char* op = "block_epilogue_bwd (CUDA)";
  check_z(op, z_in);
  c10::cuda::CUDAGuard guard(z_in.device());
  const Tensor z = kernel_layout(z_in);
  Tensor f_dev, step_dev;
  const Cfg c = make_cfg(op, z, f, step, c_lp, scheme, combine, a_quant, a_bits, phi, psi, f_dev, step_dev);
  check_device(op, grad_in, "grad", z);
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == c.n && grad_in.size(1) == c.c_out &&
                  grad_in.size(2) == z.size(2) && grad_in.size(3) == z.size(3),
              op, ": grad must have the output's shape (", c.n, ", ", c.c_out, ", ", z.size(2), ", ",
              z.size(3), "), got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == z.scalar_type(), op, ": grad must have z's dtype ",
              z.scalar_type(), ", got ", grad_in.scalar_type());
  const Tensor grad = grad_in.contiguous(format_of(c));  // the output's layout, as the kernels index it
  const Tensor w = per_channel(op, weight, "weight", z, c.c_tot);
  const Tensor b = per_channel(op, bias, "bias", z, c.c_tot);
  const Tensor m = per_channel(op, mean, "mean", z, c.c_tot);
  const Tensor v = per_channel(op, var, "var", z, c.c_tot);

  const auto fopts = z.options().dtype(at::kFloat);
  const auto dopts = z.options().dtype(at::kDouble);
  Tensor chans = at::empty({c.c_tot, 4}, fopts);
  Tensor coefs = at::empty({c.c_tot, 4}, fopts);
  Tensor dweight = at::empty({c.c_tot}, fopts);
  Tensor dbias = at::empty({c.c_tot}, fopts);
  Tensor dz = at::empty(z.sizes(), z.options().memory_format(format_of(c)));
  const int64_t count = c.n * c.hw, total = grad.numel();
  const int nb = partial_blocks(count);
  Tensor partial = at::empty({c.c_out * nb * 5}, dopts);
  Tensor ds_part = at::empty({c.c_out}, dopts);
  Chan* P = reinterpret_cast<Chan*>(chans.mutable_data_ptr<float>());
  Coef* K = reinterpret_cast<Coef*>(coefs.mutable_data_ptr<float>());

  chan_kernel<<<blocks_for(c.c_tot), kThreads, 0, stream()>>>(
      m.const_data_ptr<float>(), v.const_data_ptr<float>(), w.const_data_ptr<float>(),
      b.const_data_ptr<float>(), static_cast<float>(eps), c.c_tot, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dispatch(z.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* zp = z.const_data_ptr<T>();
    const T* gp = grad.const_data_ptr<T>();
    bwd_sums_kernel<T><<<dim3(static_cast<unsigned>(c.c_out), nb), kThreads, 0, stream()>>>(
        zp, gp, P, c, make_div(c.hw, count), partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_finish_kernel<<<blocks_for(c.c_out), kThreads, 0, stream()>>>(
        partial.const_data_ptr<double>(), nb, P, c, K, dweight.mutable_data_ptr<float>(),
        dbias.mutable_data_ptr<float>(), ds_part.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (total > 0) {
      dz_kernel<T><<<grid_for(total), kThreads, 0, stream()>>>(
          zp, gp, P, K, c, make_div(c.hw, total), make_div(c.c_out, total),
          dz.mutable_data_ptr<T>(), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  Tensor dstep;
  if (c.aq == kLsq) {
    dstep = at::empty({}, fopts);
    // the number of elements Qa saw
    const int64_t numel = count * ((c.scheme == 1 && c.c_tot > c.c_lp) ? c.c_out : c.c_lp);
    dstep_kernel<<<1, kThreads, 0, stream()>>>(ds_part.const_data_ptr<double>(), c.c_out, numel,
                                               c.levels, dstep.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    dstep = at::zeros({}, fopts);
  }
  return {dz, dweight.to(weight.scalar_type()), dbias.to(bias.scalar_type()), dstep};
}

}  // namespace

// The schemas are defined in csrc/cpu/block_cpu.cpp (TORCH_LIBRARY_FRAGMENT(expcuda_C, ...)).
TORCH_LIBRARY_IMPL(expcuda_C, CUDA, m) {
  m.impl("block_epilogue_fwd", &block_epilogue_fwd_cuda);
  m.impl("block_epilogue_bwd", &block_epilogue_bwd_cuda);
}

}  // namespace expcuda
