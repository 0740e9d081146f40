// Host-side declarations shared by the CPU and CUDA implementations of the dual-path depthwise
// 3x3 convolution: argument checks, output shapes and the output memory-format rule.
//
// Op semantics (N, C, H, W input; weight (2C, 1, 3, 3); padding 1; stride 1 or 2):
//   y[n, c] = conv3x3(x[n, c], w[2c] + w[2c + 1])            (linearity: one conv, summed kernel)
//   gx[n, c] = conv3x3^T(g[n, c], w[2c] + w[2c + 1])
//   gw[2c] = gw[2c + 1] = sum_n corr3x3(x[n, c], g[n, c])     (shared gradient, duplicated)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pcfast {

// Output spatial size of a 3x3 conv with padding 1.
inline int64_t dwconv_out_size(int64_t in, int64_t stride) { return (in - 1) / stride + 1; }

// Outputs are channels_last exactly when the input is channels_last-contiguous but not
// NCHW-contiguous; anything else gives NCHW. The Python fake implementation mirrors this rule.
inline at::MemoryFormat dwconv_out_format(const at::Tensor& t) {
  return (t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous())
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline void check_dwconv_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "dwconv supports float32, float64, float16 and bfloat16, got ", name, " of dtype ",
              s);
}

// Checks a (N, C, H, W) activation against a (2C, 1, 3, 3) dual-path weight.
inline void check_dwconv_args(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                              const char* x_name) {
  TORCH_CHECK(x.dim() == 4, "dwconv expects a 4-D (N, C, H, W) ", x_name, ", got ", x.dim(),
              "-D");
  TORCH_CHECK(weight.dim() == 4, "dwconv expects a 4-D (2C, 1, 3, 3) weight, got ", weight.dim(),
              "-D");
  TORCH_CHECK(weight.size(2) == 3 && weight.size(3) == 3,
              "dwconv supports kernel 3x3 only, got ", weight.size(2), "x", weight.size(3));
  TORCH_CHECK(weight.size(0) == 2 * x.size(1) && weight.size(1) == 1,
              "dwconv expects weight of shape (2C, 1, 3, 3) = (", 2 * x.size(1),
              ", 1, 3, 3) for C=", x.size(1), ", got ", weight.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "dwconv supports stride 1 or 2, got ", stride);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "dwconv expects ", x_name,
              " and weight of one dtype, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), "dwconv expects ", x_name,
              " and weight on one device, got ", x.device(), " and ", weight.device());
  check_dwconv_dtype(x, x_name);
}

inline void check_dwconv_bwd_input_args(const at::Tensor& grad_out, const at::Tensor& weight,
                                        int64_t stride, int64_t in_h, int64_t in_w) {
  check_dwconv_args(grad_out, weight, stride, "grad_out");
  TORCH_CHECK(in_h > 0 && in_w > 0 && dwconv_out_size(in_h, stride) == grad_out.size(2) &&
                  dwconv_out_size(in_w, stride) == grad_out.size(3),
              "dwconv_bwd_input: input size (", in_h, ", ", in_w, ") with stride ", stride,
              " does not give grad_out's spatial size (", grad_out.size(2), ", ",
              grad_out.size(3), ")");
}

inline void check_dwconv_bwd_weight_args(const at::Tensor& grad_out, const at::Tensor& x,
                                         int64_t stride) {
  TORCH_CHECK(x.dim() == 4 && grad_out.dim() == 4,
              "dwconv_bwd_weight expects 4-D x and grad_out, got ", x.dim(), "-D and ",
              grad_out.dim(), "-D");
  TORCH_CHECK(stride == 1 || stride == 2, "dwconv supports stride 1 or 2, got ", stride);
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1) &&
                  grad_out.size(2) == dwconv_out_size(x.size(2), stride) &&
                  grad_out.size(3) == dwconv_out_size(x.size(3), stride),
              "dwconv_bwd_weight: grad_out shape ", grad_out.sizes(),
              " does not match x shape ", x.sizes(), " with stride ", stride);
  TORCH_CHECK(x.scalar_type() == grad_out.scalar_type() && x.device() == grad_out.device(),
              "dwconv_bwd_weight expects x and grad_out of one dtype and device");
  check_dwconv_dtype(x, "x");
}

}  // namespace pcfast
