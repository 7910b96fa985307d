// Bit-packed integer convolution on a GPU: the CUDA kernel of expcuda_C::packed_conv2d.
//
// The same op as csrc/cpu/packed_cpu.cpp (whose file defines the schema): S[n,y,x,o] = sum of
// p*q and T[n,y,x] = sum of p over the in-bounds taps and channels, for uint8 activation codes p
// (NHWC) and weight codes q stored as bit planes [O, KH, KW, w_bits, ceil(C/8)];
// expcuda/deploy/reference.py is the definition of correct.  Three passes:
//   1. each pixel's codes into a_bits planes of ceil(C/8) bytes (the weights' layout), and the
//      pixel's code sum;
//   2. S by bit-serial AND + popcount: S = sum_ij 2^(i+j) popc(x_i AND w_j), one thread per
//      output value, 32 channels a word where the plane rows allow it, bytes at the tail;
//   3. T as the sum of the pixel sums over the in-bounds taps.
// Padded taps are skipped, so a padded zero adds nothing (whatever a code 0 stands for).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/packed_checks.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace expcuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65535)); }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// planes[pix, i, b] = bit i of the codes of channels 8b..8b+7 (channel 8b+k at bit k); psum[pix].
__global__ void pack_pixels_kernel(const uint8_t* __restrict__ x, uint8_t* __restrict__ planes,
                                   int32_t* __restrict__ psum, int64_t pixels, int c, int cb, int a_bits) {
  for (int64_t pix = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; pix < pixels;
       pix += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t* px = x + pix * c;
    uint8_t* out = planes + pix * a_bits * cb;
    int32_t sum = 0;
    for (int b = 0; b < cb; ++b) {
      uint32_t byte[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < 8 && 8 * b + k < c; ++k) {
        uint32_t code = px[8 * b + k];
        sum += static_cast<int32_t>(code);
        for (int i = 0; i < a_bits; ++i) byte[i] |= ((code >> i) & 1u) << k;
      }
      for (int i = 0; i < a_bits; ++i) out[i * cb + b] = static_cast<uint8_t>(byte[i]);
    }
    psum[pix] = sum;
  }
}

// sum over the plane row of popc(x AND w): words while both rows are 4-byte aligned, then bytes.
__device__ __forceinline__ int and_popcount(const uint8_t* __restrict__ a, const uint8_t* __restrict__ w, int cb,
                                            bool words) {
  int count = 0, b = 0;
  if (words) {
    for (; b + 4 <= cb; b += 4)
      count += __popc(*reinterpret_cast<const uint32_t*>(a + b) & *reinterpret_cast<const uint32_t*>(w + b));
  }
  for (; b < cb; ++b) count += __popc(static_cast<uint32_t>(a[b] & w[b]));
  return count;
}

struct Geometry {
  int64_t n, h, w, o, kh, kw, ho, wo;
  int c, cb, stride, pad, a_bits, w_bits;
  bool words;  // plane rows a multiple of 4 bytes from 4-byte aligned bases: 32 channels a load
};

// f(ky, kx, iy, ix) for each tap of output pixel (oy, ox) inside the input: padded taps are skipped.
template <typename F>
__device__ __forceinline__ void for_each_tap(const Geometry& g, int64_t oy, int64_t ox, F f) {
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = oy * g.stride - g.pad + ky;
    if (iy < 0 || iy >= g.h) continue;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t ix = ox * g.stride - g.pad + kx;
      if (ix >= 0 && ix < g.w) f(ky, kx, iy, ix);
    }
  }
}

__global__ void s_kernel(const uint8_t* __restrict__ planes, const uint8_t* __restrict__ wp,
                         int32_t* __restrict__ s, Geometry g) {
  const int64_t total = g.n * g.ho * g.wo * g.o;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = idx % g.o;
    int64_t rest = idx / g.o;
    const int64_t ox = rest % g.wo;
    rest /= g.wo;
    const int64_t oy = rest % g.ho;
    const int64_t n = rest / g.ho;
    int64_t acc = 0;
    for_each_tap(g, oy, ox, [&](int64_t ky, int64_t kx, int64_t iy, int64_t ix) {
      const uint8_t* xa = planes + ((n * g.h + iy) * g.w + ix) * g.a_bits * g.cb;
      const uint8_t* wa = wp + ((o * g.kh + ky) * g.kw + kx) * g.w_bits * g.cb;
      for (int i = 0; i < g.a_bits; ++i)
        for (int j = 0; j < g.w_bits; ++j)
          acc += static_cast<int64_t>(and_popcount(xa + i * g.cb, wa + j * g.cb, g.cb, g.words)) << (i + j);
    });
    s[idx] = static_cast<int32_t>(acc);
  }
}

__global__ void t_kernel(const int32_t* __restrict__ psum, int32_t* __restrict__ t, Geometry g) {
  const int64_t total = g.n * g.ho * g.wo;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ox = idx % g.wo;
    const int64_t oy = (idx / g.wo) % g.ho;
    const int64_t n = idx / (g.wo * g.ho);
    int32_t sum = 0;
    for_each_tap(g, oy, ox, [&](int64_t, int64_t, int64_t iy, int64_t ix) { sum += psum[(n * g.h + iy) * g.w + ix]; });
    t[idx] = sum;
  }
}


std::tuple<Tensor, Tensor> packed_conv2d_cuda(const Tensor& x_codes, const Tensor& w_planes, int64_t channels,
                                              int64_t a_bits, int64_t w_bits, int64_t stride, int64_t padding) {
  check_packed_args(x_codes, w_planes, channels, a_bits, w_bits, stride, padding, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(x_codes.device());
  const Tensor x = x_codes.contiguous(), wt = w_planes.contiguous();
  if (x.numel() > 0) {  // one host sync: the codes must fit a_bits (as the CPU kernel checks)
    const int top = x.max().item<uint8_t>();
    TORCH_CHECK_VALUE(top < (1 << a_bits), "packed_conv2d: x_codes must be < 2**a_bits = ", 1 << a_bits,
                      " for a_bits=", a_bits, ", got a code ", top);
  }
  Geometry g;
  g.n = x.size(0), g.h = x.size(1), g.w = x.size(2), g.o = wt.size(0), g.kh = wt.size(1), g.kw = wt.size(2);
  g.c = static_cast<int>(channels), g.cb = static_cast<int>((channels + 7) / 8);
  g.stride = static_cast<int>(stride), g.pad = static_cast<int>(padding);
  g.a_bits = static_cast<int>(a_bits), g.w_bits = static_cast<int>(w_bits);
  g.ho = (g.h + 2 * padding - g.kh) / stride + 1;
  g.wo = (g.w + 2 * padding - g.kw) / stride + 1;
  Tensor s = at::empty({g.n, g.ho, g.wo, g.o}, x.options().dtype(at::kInt));
  Tensor t = at::empty({g.n, g.ho, g.wo}, x.options().dtype(at::kInt));
  const int64_t pixels = g.n * g.h * g.w;
  if (s.numel() == 0 && t.numel() == 0) return {s, t};
  Tensor planes = at::empty({pixels, g.a_bits, g.cb}, x.options());
  g.words = g.cb % 4 == 0 && reinterpret_cast<uintptr_t>(planes.const_data_ptr()) % 4 == 0 &&
            reinterpret_cast<uintptr_t>(wt.const_data_ptr()) % 4 == 0;
  Tensor psum = at::empty({pixels}, x.options().dtype(at::kInt));
  if (pixels > 0) {
    pack_pixels_kernel<<<blocks_for(pixels), kThreads, 0, stream()>>>(
        x.const_data_ptr<uint8_t>(), planes.mutable_data_ptr<uint8_t>(), psum.mutable_data_ptr<int32_t>(), pixels,
        g.c, g.cb, g.a_bits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (s.numel() > 0) {
    s_kernel<<<blocks_for(s.numel()), kThreads, 0, stream()>>>(planes.const_data_ptr<uint8_t>(),
                                                                wt.const_data_ptr<uint8_t>(),
                                                                s.mutable_data_ptr<int32_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (t.numel() > 0) {
    t_kernel<<<blocks_for(t.numel()), kThreads, 0, stream()>>>(psum.const_data_ptr<int32_t>(),
                                                                t.mutable_data_ptr<int32_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {s, t};
}

}  // namespace

// The schema is defined in csrc/cpu/packed_cpu.cpp (TORCH_LIBRARY_FRAGMENT), which every build compiles.
TORCH_LIBRARY_IMPL(expcuda_C, CUDA, m) { m.impl("packed_conv2d", &packed_conv2d_cuda); }

}  // namespace expcuda
