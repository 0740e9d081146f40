// Registers the CUDA implementations of the dwconv ops (kernels in dwconv_*.cu) and holds the
// launch check they share.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "dwconv_cuda.cuh"

#ifndef PCFAST_CUDA_ARCHS
#define PCFAST_CUDA_ARCHS "unknown"
#endif

namespace pcfast {

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    int device = 0;
    cudaDeviceProp prop{};
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    TORCH_CHECK(false, "pcfast::", op, ": pcfast._C has no kernel for this GPU, ", prop.name,
                " (compute capability ", prop.major, ".", prop.minor,
                "): it was compiled for CUDA architectures ", PCFAST_CUDA_ARCHS,
                ". Rebuild it for this GPU with `PCFAST_CUDA_ARCHS=\"", prop.major, ".",
                prop.minor, "\" pip install --no-build-isolation -e .` in the pcfast checkout");
  }
  C10_CUDA_CHECK(err);
}

}  // namespace pcfast

TORCH_LIBRARY_IMPL(pcfast, CUDA, m) {
  m.impl("dwconv_fwd", &pcfast::dwconv_fwd_cuda);
  m.impl("dwconv_bwd_input", &pcfast::dwconv_bwd_input_cuda);
  m.impl("dwconv_bwd_weight", &pcfast::dwconv_bwd_weight_cuda);
}
