// CUDA forward of the dual-path depthwise 3x3 conv: one depthwise conv with the summed kernel
// w[2c] + w[2c + 1], padding 1, stride S in {1, 2}. See dwconv_cuda.cuh for the tiling.
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

template <typename scalar_t, int S>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dwconv_fwd_kernel(const DwconvParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kInRows = (kRowsPerThread - 1) * S + 3;  // input rows one thread reads
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const int tile_w = blockDim.x;
  const int tile_h = blockDim.y * kRowsPerThread;
  const int smem_h = (tile_h - 1) * S + 3;
  const int smem_w = (tile_w - 1) * S + 3;
  const int tiles_w = (p.out_w + tile_w - 1) / tile_w;
  const int oy0 = (blockIdx.y / tiles_w) * tile_h;
  const int ox0 = (blockIdx.y % tiles_w) * tile_w;
  const int iy0 = oy0 * S - 1;
  const int ix0 = ox0 * S - 1;

  const int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z;
  const bool active = plane < p.planes;
  acc_t* tile = smem + threadIdx.z * smem_h * smem_w;

  // Stage the input tile with its zero-padded halo; row-major so a warp reads along W.
  const scalar_t* in = static_cast<const scalar_t*>(p.in) + (active ? plane : 0) * p.in_plane_stride;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  for (int i = tid; i < smem_h * smem_w; i += nthreads) {
    const int r = i / smem_w;
    const int col = i - r * smem_w;
    const int iy = iy0 + r;
    const int ix = ix0 + col;
    acc_t v = 0;
    if (active && iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w) {
      v = static_cast<acc_t>(in[iy * p.in_row_stride + ix]);
    }
    tile[i] = v;
  }
  __syncthreads();

  const int ox = ox0 + threadIdx.x;
  const int oy_first = oy0 + threadIdx.y * kRowsPerThread;
  if (!active || ox >= p.out_w || oy_first >= p.out_h) return;

  const int c = static_cast<int>(plane % p.channels);
  const scalar_t* w = static_cast<const scalar_t*>(p.weight) + 2 * c * 9;
  acc_t k[9];
#pragma unroll
  for (int j = 0; j < 9; ++j) k[j] = static_cast<acc_t>(w[j]) + static_cast<acc_t>(w[9 + j]);

  // The kRowsPerThread outputs of this thread share input rows: read each once into registers.
  acc_t v[kInRows][3];
  const int r0 = threadIdx.y * kRowsPerThread * S;
  const int c0 = threadIdx.x * S;
#pragma unroll
  for (int r = 0; r < kInRows; ++r) {
#pragma unroll
    for (int kx = 0; kx < 3; ++kx) v[r][kx] = tile[(r0 + r) * smem_w + c0 + kx];
  }

  scalar_t* out = static_cast<scalar_t*>(p.out) + plane * p.out_plane_stride;
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int oy = oy_first + j;
    if (oy < p.out_h) {
      acc_t acc = 0;
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) acc += k[ky * 3 + kx] * v[j * S + ky][kx];
      }
      out[oy * p.out_row_stride + ox] = static_cast<scalar_t>(acc);
    }
  }
}

}  // namespace

at::Tensor dwconv_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, int64_t stride) {
  check_dwconv_args(x_in, weight_in, stride, "x");
  TORCH_CHECK(x_in.is_cuda(), "dwconv_fwd CUDA kernel needs CUDA tensors, got ", x_in.device());
  c10::cuda::CUDAGuard guard(x_in.device());
  // The kernel reads NCHW-contiguous planes; other layouts (channels_last, views) convert here.
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = dwconv_out_size(H, stride), Wo = dwconv_out_size(W, stride);
  at::Tensor y = at::empty({N, C, Ho, Wo}, x.options());
  if (y.numel() == 0) return y.contiguous(dwconv_out_format(x_in));

  DwconvParams p{};
  p.in = x.const_data_ptr();
  p.weight = weight.const_data_ptr();
  p.out = y.mutable_data_ptr();
  p.planes = N * C;
  p.channels = static_cast<int>(C);
  p.in_h = static_cast<int>(H);
  p.in_w = static_cast<int>(W);
  p.out_h = static_cast<int>(Ho);
  p.out_w = static_cast<int>(Wo);
  p.in_plane_stride = H * W;
  p.out_plane_stride = Ho * Wo;
  p.in_row_stride = W;
  p.out_row_stride = Wo;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int s = static_cast<int>(stride);
    const TilePlan t = plan_tiles(
        p.out_h, p.out_w, p.planes, sizeof(acc_t), [s](int th) { return (th - 1) * s + 3; },
        [s](int tw) { return (tw - 1) * s + 3; });
    const dim3 block(t.tile_w, t.thread_rows, t.planes);
    const dim3 grid(static_cast<unsigned>((p.planes + t.planes - 1) / t.planes),
                    static_cast<unsigned>(t.tiles_w * t.tiles_h));
    if (stride == 1) {
      dwconv_fwd_kernel<scalar_t, 1><<<grid, block, t.smem_bytes, stream>>>(p);
      check_launch("dwconv_fwd");
    } else {
      dwconv_fwd_kernel<scalar_t, 2><<<grid, block, t.smem_bytes, stream>>>(p);
      check_launch("dwconv_fwd");
    }
  });
  return y.contiguous(dwconv_out_format(x_in));
}

}  // namespace pcfast
