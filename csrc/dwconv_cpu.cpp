// CPU implementation of the dual-path depthwise 3x3 conv: one (n, c) plane per task, read
// through arbitrary element strides (so NCHW, channels_last and strided views need no copy) into
// a zero-bordered opmath buffer, then the vectorized gathers of dw3x3_cpu.h; accumulation in
// at::opmath_type (float for half types, double for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dw3x3_cpu.h"
#include "dwconv.h"

namespace pcfast {
namespace {

// Element strides of one (H, W) plane and of the (N, C) plane index.
struct PlaneStrides {
  int64_t n, c, h, w;
};

PlaneStrides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Summed kernel of channel c: w[2c] + w[2c + 1], read through the weight's own strides.
template <typename scalar_t, typename acc_t>
void summed_kernel(const at::Tensor& weight, int64_t c, acc_t* k) {
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const int64_t s0 = weight.stride(0), s2 = weight.stride(2), s3 = weight.stride(3);
  for (int64_t ky = 0; ky < 3; ++ky) {
    for (int64_t kx = 0; kx < 3; ++kx) {
      const int64_t off = ky * s2 + kx * s3;
      k[ky * 3 + kx] =
          static_cast<acc_t>(w[2 * c * s0 + off]) + static_cast<acc_t>(w[(2 * c + 1) * s0 + off]);
    }
  }
}

// dst (any element strides) <- a dense (H, W) opmath plane, rounded to scalar_t.
template <typename scalar_t, typename acc_t>
void store_plane(const acc_t* __restrict src, int64_t H, int64_t W, scalar_t* dst, int64_t sh,
                 int64_t sw) {
  for (int64_t y = 0; y < H; ++y) {
    const acc_t* __restrict s = src + y * W;
    scalar_t* d = dst + y * sh;
    if (sw == 1) {
      for (int64_t x = 0; x < W; ++x) d[x] = static_cast<scalar_t>(s[x]);
    } else {
      for (int64_t x = 0; x < W; ++x) d[x * sw] = static_cast<scalar_t>(s[x]);
    }
  }
}

at::Tensor fwd_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  check_dwconv_args(x, weight, stride, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = dwconv_out_size(H, stride), Wo = dwconv_out_size(W, stride);
  at::Tensor y = at::empty({N, C, Ho, Wo}, x.options().memory_format(dwconv_out_format(x)));
  const PlaneStrides xs = strides_of(x), ys = strides_of(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> padded((H + 2) * (W + 2), acc_t(0)), out(Ho * Wo);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C;
        acc_t k[9];
        summed_kernel<scalar_t>(weight, c, k);
        load_padded<scalar_t, acc_t>(xp + n * xs.n + c * xs.c, xs.h, xs.w, H, W, padded.data());
        dw3x3_fwd_plane<acc_t>(padded.data(), k, W, Ho, Wo, stride, out.data());
        store_plane<scalar_t, acc_t>(out.data(), Ho, Wo, yp + n * ys.n + c * ys.c, ys.h, ys.w);
      }
    });
  });
  return y;
}

// gx[iy, ix] = sum_{ky, kx} k[ky, kx] * g[(iy + 1 - ky) / s, (ix + 1 - kx) / s] over the whole
// quotients: the transposed conv as a gather over the zero-bordered plane of g.
at::Tensor bwd_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight, int64_t stride,
                         int64_t in_h, int64_t in_w) {
  check_dwconv_bwd_input_args(grad_out, weight, stride, in_h, in_w);
  const int64_t N = grad_out.size(0), C = grad_out.size(1);
  const int64_t Ho = grad_out.size(2), Wo = grad_out.size(3);
  at::Tensor gx = at::empty({N, C, in_h, in_w},
                            grad_out.options().memory_format(dwconv_out_format(grad_out)));
  const PlaneStrides gs = strides_of(grad_out), xs = strides_of(gx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "dwconv_bwd_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    scalar_t* xp = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> padded((Ho + 2) * (Wo + 2), acc_t(0)), out(in_h * in_w);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C;
        acc_t k[9];
        summed_kernel<scalar_t>(weight, c, k);
        load_padded<scalar_t, acc_t>(gp + n * gs.n + c * gs.c, gs.h, gs.w, Ho, Wo, padded.data());
        if (stride == 1) {
          transposed_dw3x3_s1<acc_t>(padded.data(), k, in_h, in_w, out.data());
        } else {
          transposed_dw3x3_s2<acc_t>(padded.data(), k, Ho, Wo, in_h, in_w, out.data());
        }
        store_plane<scalar_t, acc_t>(out.data(), in_h, in_w, xp + n * xs.n + c * xs.c, xs.h,
                                     xs.w);
      }
    });
  });
  return gx;
}

// gw_shared[c, ky, kx] = sum_{n, oy, ox} g[n, c, oy, ox] * x[n, c, oy * s - 1 + ky, ox * s - 1 + kx].
// Per-(n, c) partial sums in opmath precision, then a deterministic sum over n.
at::Tensor bwd_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x, int64_t stride) {
  check_dwconv_bwd_weight_args(grad_out, x, stride);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = grad_out.size(2), Wo = grad_out.size(3);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({N, C, 9}, x.options().dtype(acc_type));
  const PlaneStrides gs = strides_of(grad_out), xs = strides_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "dwconv_bwd_weight_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> padded((H + 2) * (W + 2), acc_t(0)), gd(Ho * Wo), cols(9 * Wo);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C;
        load_padded<scalar_t, acc_t>(xp + n * xs.n + c * xs.c, xs.h, xs.w, H, W, padded.data());
        const scalar_t* gin = gp + n * gs.n + c * gs.c;
        for (int64_t oy = 0; oy < Ho; ++oy) {
          for (int64_t ox = 0; ox < Wo; ++ox) {
            gd[oy * Wo + ox] = static_cast<acc_t>(gin[oy * gs.h + ox * gs.w]);
          }
        }
        acc_t acc[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        dw3x3_weight_plane<acc_t>(padded.data(), gd.data(), W, Ho, Wo, stride, cols.data(), acc);
        for (int k = 0; k < 9; ++k) pp[p * 9 + k] = acc[k];
      }
    });
  });
  // (C, 9) shared gradient -> both paths of every channel: (C, 2, 9) -> (2C, 1, 3, 3).
  at::Tensor shared = partial.sum(0);
  return shared.unsqueeze(1).expand({C, 2, 9}).reshape({2 * C, 1, 3, 3}).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pcfast, CPU, m) {
  m.impl("dwconv_fwd", &fwd_cpu);
  m.impl("dwconv_bwd_input", &bwd_input_cpu);
  m.impl("dwconv_bwd_weight", &bwd_weight_cpu);
}

}  // namespace pcfast
