// CUDA input-VJP of the dual-path depthwise 3x3 conv (padding 1, stride S in {1, 2}):
//   gx[iy, ix] = sum_{ky, kx : iy + 1 - ky = S * oy, ix + 1 - kx = S * ox} k[ky, kx] * g[oy, ox]
// with k = w[2c] + w[2c + 1]. Each thread gathers its input pixels (no atomics). For S = 1 this
// is the conv with the 180-degree-rotated kernel; for S = 2 (the transposed, strided case) only
// taps of matching parity contribute. Tiling as in dwconv_cuda.cuh, over the gx plane.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dwconv.h"
#include "dwconv_cuda.cuh"

namespace pcfast {
namespace {

// Rows (or columns) of grad_out that a tile of `n` gx pixels reads, for any tile origin.
__host__ __device__ inline int grad_tile_extent(int n, int s) { return (n + 1) / s + 2; }

// floor(a / S) for a >= -S.
template <int S>
__device__ inline int floor_div(int a) {
  return (a + S) / S - 1;
}

template <typename scalar_t, int S>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dwconv_bwd_input_kernel(const DwconvParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  // Here "in" is grad_out (out_h x out_w of the forward is in_h x in_w of this kernel's read)
  // and "out" is gx.
  const int tile_w = blockDim.x;
  const int tile_h = blockDim.y * kRowsPerThread;
  const int smem_h = grad_tile_extent(tile_h, S);
  const int smem_w = grad_tile_extent(tile_w, S);
  const int tiles_w = (p.out_w + tile_w - 1) / tile_w;
  const int gy_origin = (blockIdx.y / tiles_w) * tile_h;  // first gx row of the tile
  const int gx_origin = (blockIdx.y % tiles_w) * tile_w;
  const int oy0 = floor_div<S>(gy_origin - 1);  // first grad_out row the tile reads
  const int ox0 = floor_div<S>(gx_origin - 1);

  const int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z;
  const bool active = plane < p.planes;
  acc_t* tile = smem + threadIdx.z * smem_h * smem_w;

  const scalar_t* g = static_cast<const scalar_t*>(p.in) + (active ? plane : 0) * p.in_plane_stride;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  for (int i = tid; i < smem_h * smem_w; i += nthreads) {
    const int r = i / smem_w;
    const int col = i - r * smem_w;
    const int oy = oy0 + r;
    const int ox = ox0 + col;
    acc_t v = 0;
    if (active && oy >= 0 && oy < p.in_h && ox >= 0 && ox < p.in_w) {
      v = static_cast<acc_t>(g[oy * p.in_row_stride + ox]);
    }
    tile[i] = v;
  }
  __syncthreads();

  const int ix = gx_origin + threadIdx.x;
  const int iy_first = gy_origin + threadIdx.y * kRowsPerThread;
  if (!active || ix >= p.out_w || iy_first >= p.out_h) return;

  const int c = static_cast<int>(plane % p.channels);
  const scalar_t* w = static_cast<const scalar_t*>(p.weight) + 2 * c * 9;
  acc_t k[9];
#pragma unroll
  for (int j = 0; j < 9; ++j) k[j] = static_cast<acc_t>(w[j]) + static_cast<acc_t>(w[9 + j]);

  scalar_t* gx = static_cast<scalar_t*>(p.out) + plane * p.out_plane_stride;
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int iy = iy_first + j;
    if (iy < p.out_h) {
      acc_t acc = 0;
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
        const int ty = iy + 1 - ky;  // = S * oy when tap ky reaches row iy
        if (S == 1 || (ty & 1) == 0) {
          const int r = floor_div<S>(ty) - oy0;
#pragma unroll
          for (int kx = 0; kx < 3; ++kx) {
            const int tx = ix + 1 - kx;
            if (S == 1 || (tx & 1) == 0) {
              acc += k[ky * 3 + kx] * tile[r * smem_w + floor_div<S>(tx) - ox0];
            }
          }
        }
      }
      gx[iy * p.out_row_stride + ix] = static_cast<scalar_t>(acc);
    }
  }
}

}  // namespace

at::Tensor dwconv_bwd_input_cuda(const at::Tensor& grad_in, const at::Tensor& weight_in,
                                 int64_t stride, int64_t in_h, int64_t in_w) {
  check_dwconv_bwd_input_args(grad_in, weight_in, stride, in_h, in_w);
  TORCH_CHECK(grad_in.is_cuda(), "dwconv_bwd_input CUDA kernel needs CUDA tensors, got ",
              grad_in.device());
  c10::cuda::CUDAGuard guard(grad_in.device());
  // NCHW-contiguous planes; other layouts (channels_last, expanded grads) convert here.
  const at::Tensor g = grad_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t N = g.size(0), C = g.size(1), Ho = g.size(2), Wo = g.size(3);
  at::Tensor gx = at::empty({N, C, in_h, in_w}, g.options());
  if (gx.numel() == 0) return gx.contiguous(dwconv_out_format(grad_in));

  DwconvParams p{};
  p.in = g.const_data_ptr();
  p.weight = weight.const_data_ptr();
  p.out = gx.mutable_data_ptr();
  p.planes = N * C;
  p.channels = static_cast<int>(C);
  p.in_h = static_cast<int>(Ho);
  p.in_w = static_cast<int>(Wo);
  p.out_h = static_cast<int>(in_h);
  p.out_w = static_cast<int>(in_w);
  p.in_plane_stride = Ho * Wo;
  p.out_plane_stride = in_h * in_w;
  p.in_row_stride = Wo;
  p.out_row_stride = in_w;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "dwconv_bwd_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int s = static_cast<int>(stride);
    const TilePlan t = plan_tiles(
        p.out_h, p.out_w, p.planes, sizeof(acc_t),
        [s](int th) { return grad_tile_extent(th, s); },
        [s](int tw) { return grad_tile_extent(tw, s); });
    const dim3 block(t.tile_w, t.thread_rows, t.planes);
    const dim3 grid(static_cast<unsigned>((p.planes + t.planes - 1) / t.planes),
                    static_cast<unsigned>(t.tiles_w * t.tiles_h));
    if (stride == 1) {
      dwconv_bwd_input_kernel<scalar_t, 1><<<grid, block, t.smem_bytes, stream>>>(p);
      check_launch("dwconv_bwd_input");
    } else {
      dwconv_bwd_input_kernel<scalar_t, 2><<<grid, block, t.smem_bytes, stream>>>(p);
      check_launch("dwconv_bwd_input");
    }
  });
  return gx.contiguous(dwconv_out_format(grad_in));
}

}  // namespace pcfast
