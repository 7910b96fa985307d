// The C++ autograd ops of csrc/cpu/ste_autograd.cpp, for the Python bindings in csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace expcuda {

at::Tensor dorefa_activation_ste(const at::Tensor& x, int64_t bits);
at::Tensor sign_activation_ste(const at::Tensor& x);

}  // namespace expcuda
