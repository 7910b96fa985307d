// The schemas of the expcuda_C operator library and the Python module expcuda._C.
//
// The CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) register implementations of
// these schemas; torch's dispatcher picks one by the inputs' device.  The Python wrappers
// are in expcuda/_backends/compiled.py.  Granularity codes: 0 = layer, 1 = row, 2 = pixel.
#include <torch/extension.h>

TORCH_LIBRARY(expcuda_C, m) {
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

// Importing expcuda._C loads this library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
