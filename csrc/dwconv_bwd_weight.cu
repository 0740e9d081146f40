// CUDA weight-VJP of the dual-path depthwise 3x3 conv: the shared depthwise weight gradient
//   dk[c, ky, kx] = sum_{n, oy, ox} g[n, c, oy, ox] * x[n, c, S * oy - 1 + ky, S * ox - 1 + kx],
// returned for both paths: gw[2c] = gw[2c + 1] = dk[c].
// Pass 1: grid (C, B); block b of channel c reduces a contiguous chunk of the flattened
// (n, oy, ox) range into 9 sums (registers -> warp shuffles -> shared memory) and writes them to
// a float32 (float64 for double) workspace (C, B, 9). Pass 2: a deterministic sum over B.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "dwconv.h"
#include "dwconv_cuda.cuh"

namespace pcfast {
namespace {

constexpr int kWarps = kThreadsPerBlock / 32;
constexpr int64_t kOutputsPerBlock = 4096;  // target work per block before splitting further
constexpr int kMaxBlocksPerChannel = 128;

struct BwdWeightParams {
  const void* grad_out;  // (N, C, Ho, Wo) contiguous
  const void* x;         // (N, C, H, W) contiguous
  void* partial;         // (C, B, 9) accumulation type
  int64_t per_channel;   // N * Ho * Wo
  int channels, in_h, in_w, out_h, out_w;
};

template <typename acc_t>
__device__ inline acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t, int S>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dwconv_bwd_weight_kernel(const BwdWeightParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t warp_sums[kWarps][9];
  const int c = blockIdx.x;
  const int blocks = gridDim.y;
  const int64_t begin = p.per_channel * blockIdx.y / blocks;
  const int64_t end = p.per_channel * (blockIdx.y + 1) / blocks;
  const int64_t out_plane = static_cast<int64_t>(p.out_h) * p.out_w;
  const int64_t in_plane = static_cast<int64_t>(p.in_h) * p.in_w;
  const scalar_t* g = static_cast<const scalar_t*>(p.grad_out);
  const scalar_t* x = static_cast<const scalar_t*>(p.x);

  acc_t acc[9];
#pragma unroll
  for (int j = 0; j < 9; ++j) acc[j] = 0;
  // Consecutive threads take consecutive ox: coalesced grad_out reads, x reads hit L1/L2.
  for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
    const int64_t n = e / out_plane;
    const int rem = static_cast<int>(e - n * out_plane);
    const int oy = rem / p.out_w;
    const int ox = rem - oy * p.out_w;
    const int64_t nc = n * p.channels + c;
    const acc_t gv = static_cast<acc_t>(g[nc * out_plane + rem]);
    const scalar_t* xp = x + nc * in_plane;
#pragma unroll
    for (int ky = 0; ky < 3; ++ky) {
      const int iy = oy * S - 1 + ky;
      if (iy >= 0 && iy < p.in_h) {
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          const int ix = ox * S - 1 + kx;
          if (ix >= 0 && ix < p.in_w) {
            acc[ky * 3 + kx] += gv * static_cast<acc_t>(xp[iy * p.in_w + ix]);
          }
        }
      }
    }
  }

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < 9; ++j) {
    const acc_t v = warp_sum(acc[j]);
    if (lane == 0) warp_sums[warp][j] = v;
  }
  __syncthreads();
  if (threadIdx.x < 9) {
    acc_t total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][threadIdx.x];
    acc_t* out = static_cast<acc_t*>(p.partial);
    out[(static_cast<int64_t>(c) * blocks + blockIdx.y) * 9 + threadIdx.x] = total;
  }
}

}  // namespace

at::Tensor dwconv_bwd_weight_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                  int64_t stride) {
  check_dwconv_bwd_weight_args(grad_in, x_in, stride);
  TORCH_CHECK(x_in.is_cuda(), "dwconv_bwd_weight CUDA kernel needs CUDA tensors, got ",
              x_in.device());
  c10::cuda::CUDAGuard guard(x_in.device());
  // NCHW-contiguous planes; other layouts (channels_last, expanded grads) convert here.
  const at::Tensor g = grad_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  BwdWeightParams p{};
  p.per_channel = N * g.size(2) * g.size(3);
  p.channels = static_cast<int>(C);
  p.in_h = static_cast<int>(x.size(2));
  p.in_w = static_cast<int>(x.size(3));
  p.out_h = static_cast<int>(g.size(2));
  p.out_w = static_cast<int>(g.size(3));
  const int blocks = static_cast<int>(std::clamp<int64_t>(
      (p.per_channel + kOutputsPerBlock - 1) / kOutputsPerBlock, 1, kMaxBlocksPerChannel));
  at::Tensor partial = at::empty({C, blocks, 9}, x.options().dtype(acc_type));
  if (C > 0) {
    TORCH_CHECK(C <= 2147483647, "dwconv_bwd_weight supports up to 2^31-1 channels, got ", C);
    p.grad_out = g.const_data_ptr();
    p.x = x.const_data_ptr();
    p.partial = partial.mutable_data_ptr();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "dwconv_bwd_weight_cuda", [&] {
      const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(blocks));
      if (stride == 1) {
        dwconv_bwd_weight_kernel<scalar_t, 1><<<grid, kThreadsPerBlock, 0, stream>>>(p);
        check_launch("dwconv_bwd_weight");
      } else {
        dwconv_bwd_weight_kernel<scalar_t, 2><<<grid, kThreadsPerBlock, 0, stream>>>(p);
        check_launch("dwconv_bwd_weight");
      }
    });
  }
  // (C, 9) shared gradient -> both paths: (C, 2, 9) -> (2C, 1, 3, 3).
  const at::Tensor shared = partial.sum(1);
  return shared.unsqueeze(1).expand({C, 2, 9}).reshape({2 * C, 1, 3, 3}).to(x.scalar_type());
}

}  // namespace pcfast
