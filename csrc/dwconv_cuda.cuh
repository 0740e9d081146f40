// Shared pieces of the CUDA dual-path depthwise 3x3 conv: the params struct, the spatial tiling
// plan and the host helpers that every launcher uses.
//
// Tiling (forward and input-VJP): a block of up to 256 threads is (tile_w, thread_rows, planes).
// Each thread computes kRowsPerThread vertically adjacent outputs of one column, so a block
// covers a (thread_rows * kRowsPerThread) x tile_w output tile of `planes` (n, c) planes at once
// (several planes per block keep small 8x8/16x16 planes from idling threads). The input tile with
// its halo is staged in shared memory in the accumulation type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace pcfast {

// Checks the kernel launch just made (as C10_CUDA_KERNEL_LAUNCH_CHECK does). A GPU for which the
// build holds neither machine code nor PTX gets an error naming the GPU, its compute capability,
// the architectures compiled and the rebuild command, instead of CUDA's bare "no kernel image".
void check_launch(const char* op);


constexpr int kRowsPerThread = 4;
constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxSharedBytes = 48 * 1024;  // the default dynamic shared-memory limit

// Strides are in elements. "in" is the tensor read (x or grad_out), "out" the tensor written.
struct DwconvParams {
  const void* in;
  const void* weight;  // (2C, 1, 3, 3) contiguous: 9 consecutive taps per path
  void* out;
  int64_t planes;  // N * C
  int channels;
  int in_h, in_w, out_h, out_w;
  int64_t in_plane_stride, out_plane_stride;
  int64_t in_row_stride, out_row_stride;
};

struct TilePlan {
  int tile_w;       // threads (and outputs) along W
  int thread_rows;  // threads along H; the tile is thread_rows * kRowsPerThread outputs tall
  int planes;       // (n, c) planes per block
  int tiles_w, tiles_h;
  int64_t smem_bytes;
};

inline int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Plans tiles over a tile_out_h x tile_out_w grid of computed pixels that read a shared tile of
// smem_rows(tile_h) x smem_cols(tile_w) values of acc_bytes each.
template <typename RowsFn, typename ColsFn>
TilePlan plan_tiles(int out_h, int out_w, int64_t planes, int acc_bytes, RowsFn smem_rows,
                    ColsFn smem_cols) {
  TilePlan t{};
  t.tile_w = std::min(32, next_pow2(out_w));
  t.thread_rows = std::min(next_pow2((out_h + kRowsPerThread - 1) / kRowsPerThread),
                           kThreadsPerBlock / t.tile_w);
  const int tile_h = t.thread_rows * kRowsPerThread;
  const int64_t per_plane =
      static_cast<int64_t>(smem_rows(tile_h)) * smem_cols(t.tile_w) * acc_bytes;
  int64_t max_planes = std::max<int64_t>(1, kThreadsPerBlock / (t.tile_w * t.thread_rows));
  max_planes = std::min<int64_t>(max_planes, std::max<int64_t>(1, planes));
  while (max_planes > 1 && max_planes * per_plane > kMaxSharedBytes) max_planes /= 2;
  t.planes = static_cast<int>(max_planes);
  t.tiles_w = (out_w + t.tile_w - 1) / t.tile_w;
  t.tiles_h = (out_h + tile_h - 1) / tile_h;
  t.smem_bytes = t.planes * per_plane;
  TORCH_CHECK(t.smem_bytes <= kMaxSharedBytes, "dwconv CUDA tile needs ", t.smem_bytes,
              " bytes of shared memory, more than the supported ", kMaxSharedBytes);
  TORCH_CHECK(static_cast<int64_t>(t.tiles_w) * t.tiles_h <= 65535,
              "dwconv CUDA supports up to 65535 spatial tiles per plane, got ",
              static_cast<int64_t>(t.tiles_w) * t.tiles_h, " for a ", out_h, "x", out_w,
              " plane");
  return t;
}

// Host launchers (one per entry point, each in its own .cu file).
at::Tensor dwconv_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t stride);
at::Tensor dwconv_bwd_input_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                                 int64_t stride, int64_t in_h, int64_t in_w);
at::Tensor dwconv_bwd_weight_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                  int64_t stride);

}  // namespace pcfast
