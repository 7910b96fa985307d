// The argument checks of expcuda_C::packed_conv2d, shared by its CPU (csrc/cpu/packed_cpu.cpp) and
// CUDA (csrc/cuda/packed_cuda.cu) kernels: each error names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace expcuda {

inline void check_packed_args(const at::Tensor& x, const at::Tensor& w, int64_t channels, int64_t a_bits,
                              int64_t w_bits, int64_t stride, int64_t padding, c10::DeviceType device) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kByte, "packed_conv2d: x_codes must be a uint8 tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kByte, "packed_conv2d: w_planes must be a uint8 tensor, got ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(x.device().type() == device && x.device() == w.device(),
                    "packed_conv2d: x_codes and w_planes must be ", c10::DeviceTypeName(device),
                    " tensors on one device, got ", x.device(), " and ", w.device());
  TORCH_CHECK_VALUE(x.dim() == 4, "packed_conv2d: x_codes must be [N, H, W, C] (NHWC), got shape ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 5, "packed_conv2d: w_planes must be [O, KH, KW, w_bits, ceil(C/8)], got shape ",
                    w.sizes());
  TORCH_CHECK_VALUE(channels >= 1, "packed_conv2d: channels must be >= 1, got ", channels);
  TORCH_CHECK_VALUE(x.size(3) == channels, "packed_conv2d: x_codes has ", x.size(3),
                    " channels (last dim), channels=", channels);
  TORCH_CHECK_VALUE(a_bits >= 1 && a_bits <= 8, "packed_conv2d: a_bits must be in 1..8, got ", a_bits);
  TORCH_CHECK_VALUE(w_bits >= 1 && w_bits <= 8, "packed_conv2d: w_bits must be in 1..8, got ", w_bits);
  TORCH_CHECK_VALUE(w.size(3) == w_bits, "packed_conv2d: w_planes dim 3 must be w_bits=", w_bits, ", got ",
                    w.size(3));
  TORCH_CHECK_VALUE(w.size(4) == (channels + 7) / 8, "packed_conv2d: w_planes' last dim must be "
                    "ceil(channels/8)=", (channels + 7) / 8, ", got ", w.size(4));
  TORCH_CHECK_VALUE(stride >= 1, "packed_conv2d: stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding >= 0, "packed_conv2d: padding must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(w.size(1) >= 1 && w.size(2) >= 1, "packed_conv2d: w_planes' kernel must be at least "
                    "1x1, got ", w.size(1), "x", w.size(2));
  TORCH_CHECK_VALUE(x.size(1) + 2 * padding >= w.size(1) && x.size(2) + 2 * padding >= w.size(2),
                    "packed_conv2d: the ", w.size(1), "x", w.size(2), " kernel is larger than x_codes' ",
                    x.size(1), "x", x.size(2), " pixels padded by ", padding);
  const double worst = static_cast<double>(w.size(1) * w.size(2) * channels) * ((1 << a_bits) - 1) *
                       ((1 << w_bits) - 1);
  TORCH_CHECK_VALUE(worst < 2147483648.0, "packed_conv2d: S could overflow int32 (", w.size(1), "x",
                    w.size(2), " taps x ", channels, " channels at ", a_bits, "/", w_bits, " bits)");
}

}  // namespace expcuda
