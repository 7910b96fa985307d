// The activation quantizers' forward + straight-through backward as one C++ autograd op.
//
// In eager mode a Python torch.autograd.Function costs more per call than the kernels on a
// small tensor.  These ops record a C++ autograd node instead: forward calls the quantizer's
// own forward kernel through the dispatcher (the CPU or CUDA one, by device), saves the
// packed STE mask and the output's strides, and backward calls mask_bwd on the gradient in
// the output's layout.  The results are those of the Python ops (tested bit for bit);
// torch.compile and opcheck use the Python custom ops (expcuda/quant/kinds) instead.
//
// Each is also bound as a plain function of expcuda._C (csrc/ops.cpp): a call through
// torch.ops costs ~3 us of Python before it reaches the dispatcher, a pybind11 call ~1 us.
#include "cpu/ste_autograd.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace expcuda {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

Tensor dense(const Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

// grad with the strides the forward output had, so the mask lines up with storage order.
Tensor as_strides(const Tensor& grad, c10::IntArrayRef strides) {
  if (grad.strides() == strides) return grad;
  return at::empty_strided(grad.sizes(), strides, grad.options()).copy_(grad);
}

Tensor mask_like(const Tensor& x) { return at::empty({(x.numel() + 7) / 8}, x.options().dtype(at::kByte)); }

void save(AutogradContext* ctx, const Tensor& y, const Tensor& mask) {
  ctx->save_for_backward({mask});
  ctx->saved_data["strides"] = c10::IValue(y.strides().vec());
}

tensor_list backward_from_mask(AutogradContext* ctx, const tensor_list& grads, size_t n_inputs) {
  tensor_list out(n_inputs);
  const Tensor& g = grads[0];
  if (!g.defined()) return out;
  Tensor mask = ctx->get_saved_variables()[0];
  std::vector<int64_t> strides = ctx->saved_data["strides"].toIntVector();
  if (g.numel() == 0) {
    out[0] = at::empty_like(g);
    return out;
  }
  static auto mask_bwd = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("expcuda_C::mask_bwd", "")
                             .typed<Tensor(const Tensor&, const Tensor&)>();
  out[0] = mask_bwd.call(as_strides(g, strides), mask);
  return out;
}

// y and the packed mask from the forward kernel (`call` on the dense x; an empty x gives empty
// outputs), saved for backward.
template <typename Call>
Tensor masked_forward(AutogradContext* ctx, const Tensor& x_in, Call call) {
  Tensor x = dense(x_in);
  Tensor y, mask;
  if (x.numel() == 0) {
    y = at::empty_like(x);
    mask = mask_like(x);
  } else {
    std::tie(y, mask) = call(x);
  }
  save(ctx, y, mask);
  return y;
}

struct DorefaActivationSte : public torch::autograd::Function<DorefaActivationSte> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, int64_t bits) {
    return masked_forward(ctx, x_in, [bits](const Tensor& x) {
      static auto fwd = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("expcuda_C::dorefa_activation_fwd", "")
                            .typed<std::tuple<Tensor, Tensor>(const Tensor&, int64_t)>();
      return fwd.call(x, bits);
    });
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) { return backward_from_mask(ctx, grads, 2); }
};

struct SignActivationSte : public torch::autograd::Function<SignActivationSte> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in) {
    return masked_forward(ctx, x_in, [](const Tensor& x) {
      static auto fwd = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("expcuda_C::sign_activation_fwd", "")
                            .typed<std::tuple<Tensor, Tensor>(const Tensor&)>();
      return fwd.call(x);
    });
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) { return backward_from_mask(ctx, grads, 1); }
};

}  // namespace

Tensor dorefa_activation_ste(const Tensor& x, int64_t bits) { return DorefaActivationSte::apply(x, bits); }
Tensor sign_activation_ste(const Tensor& x) { return SignActivationSte::apply(x); }

TORCH_LIBRARY_FRAGMENT(expcuda_C, m) {
  m.def("dorefa_activation_ste(Tensor x, int bits) -> Tensor");
  m.def("sign_activation_ste(Tensor x) -> Tensor");
}

// CompositeImplicitAutograd: the function records its own autograd node, and runs under
// no_grad and inference_mode too (where it records nothing).
TORCH_LIBRARY_IMPL(expcuda_C, CompositeImplicitAutograd, m) {
  m.impl("dorefa_activation_ste", &dorefa_activation_ste);
  m.impl("sign_activation_ste", &sign_activation_ste);
}

}  // namespace expcuda
