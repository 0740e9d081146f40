// Registers the CUDA implementations of the dwconv ops (kernels in dwconv_*.cu).
#include <torch/library.h>

#include "dwconv_cuda.cuh"

TORCH_LIBRARY_IMPL(pcfast, CUDA, m) {
  m.impl("dwconv_fwd", &pcfast::dwconv_fwd_cuda);
  m.impl("dwconv_bwd_input", &pcfast::dwconv_bwd_input_cuda);
  m.impl("dwconv_bwd_weight", &pcfast::dwconv_bwd_weight_cuda);
}
