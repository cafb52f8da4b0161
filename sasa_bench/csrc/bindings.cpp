// Python bindings of the CPU kernels. The torch.library ops that users (and torch.compile) see
// are defined in sasa_bench/kernels/ops.py on top of these functions.
#include <torch/extension.h>

#include "kernels.h"
#include "simd.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_forward", &sasa_attention_forward, "local attention forward: out, lse");
  m.def("attention_backward", &sasa_attention_backward, "local attention backward");
  m.def("stem_forward", &stem_forward, "attention stem forward");
  m.def("stem_backward", &stem_backward, "attention stem backward");
  m.def("isa", []() { return std::string(sasa::simd::kIsa); }, "the vector ISA compiled in");
  m.def("lanes", []() { return sasa::simd::kLanes; }, "fp32 lanes per vector");
}
