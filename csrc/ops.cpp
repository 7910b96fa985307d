// The expcuda_C operator library and the Python module expcuda._C.
//
// The CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) register implementations of
// the schemas; torch's dispatcher picks one by the inputs' device.  The Python wrappers
// are in expcuda/_backends/compiled.py.
#include <torch/extension.h>

#include "cpu/ste_autograd.h"

// The library itself; each kernel file defines the schemas of its ops beside their kernels
// (TORCH_LIBRARY_FRAGMENT: the quantizers in csrc/cpu/quant_cpu.cpp, the block epilogue in
// csrc/cpu/block_cpu.cpp, the packed convolution in csrc/cpu/packed_cpu.cpp).  The CPU files are
// always compiled, so every schema exists in every build; the CUDA files add implementations.
TORCH_LIBRARY(expcuda_C, m) {}

// Importing expcuda._C loads this library, which runs the registrations above.  The module's
// functions are the eager fast paths of expcuda.quant.ops.compiled_autograd: the same C++
// functions as torch.ops.expcuda_C.<name>, without torch.ops' Python around the call.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dorefa_activation_ste", &expcuda::dorefa_activation_ste, "DoReFa activation + STE (autograd)");
  m.def("sign_activation_ste", &expcuda::sign_activation_ste, "sign activation + STE (autograd)");
}
