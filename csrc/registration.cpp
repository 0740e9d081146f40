// Schemas of every op in pcfast._C. Implementations register per device in their own files
// (dwconv_cpu.cpp, dwconv_cuda.cpp, dwconv_autograd.cpp); pcfast/ops/ adds fake and autograd.
#include <torch/library.h>

#ifdef PCFAST_PYTHON_MODULE
#include <Python.h>
#endif

#ifndef PCFAST_SOURCE_HASH
#define PCFAST_SOURCE_HASH "unknown"
#endif
#ifdef PCFAST_WITH_CUDA
#define PCFAST_WITH_CUDA_FLAG 1
#else
#define PCFAST_WITH_CUDA_FLAG 0
#endif
#ifndef PCFAST_CUDA_ARCHS
#define PCFAST_CUDA_ARCHS ""
#endif
#ifndef PCFAST_TORCH_VERSION
#define PCFAST_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(pcfast, m) {
  m.def("dwconv_fwd(Tensor x, Tensor weight, int stride) -> Tensor");
  m.def(
      "dwconv_bwd_input(Tensor grad_out, Tensor weight, int stride, int in_h, int in_w) "
      "-> Tensor");
  m.def("dwconv_bwd_weight(Tensor grad_out, Tensor x, int stride) -> Tensor");
}

#ifdef PCFAST_PYTHON_MODULE
// `import pcfast._C` loads this library, which runs the registrations above. The module carries
// the build's source hash and torch version so the loader can detect a stale build, and the CUDA
// architectures it was compiled for (comma-separated, "" without CUDA).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "pcfast compiled ops (registered with torch.library)", -1,
                                   nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "source_hash", PCFAST_SOURCE_HASH) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", PCFAST_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", PCFAST_CUDA_ARCHS) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", PCFAST_WITH_CUDA_FLAG) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
#endif
