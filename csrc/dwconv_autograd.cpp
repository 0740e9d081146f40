// Autograd of dwconv_fwd in C++. A C++ autograd function asks the engine, at backward time,
// which inputs the current backward pass needs (needs_input_grad reads the graph task's
// execution info), so a backward-data pass such as a PC inference step, which asks for the
// input gradient only, runs no weight-gradient kernel. The Python autograd of the two backward
// ops (pcfast/ops/dwconv.py) provides double backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace pcfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_fwd(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pcfast::dwconv_fwd", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, weight, stride);
}

at::Tensor call_bwd_input(const at::Tensor& grad, const at::Tensor& weight, int64_t stride,
                          int64_t in_h, int64_t in_w) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pcfast::dwconv_bwd_input", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t)>();
  return op.call(grad, weight, stride, in_h, in_w);
}

at::Tensor call_bwd_weight(const at::Tensor& grad, const at::Tensor& x, int64_t stride) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pcfast::dwconv_bwd_weight", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(grad, x, stride);
}

class DwconvFunction : public torch::autograd::Function<DwconvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            int64_t stride) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["stride"] = stride;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fwd(x, weight, stride);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t stride = ctx->saved_data["stride"].toInt();
    at::Tensor gx, gw;
    if (ctx->needs_input_grad(0)) {
      gx = call_bwd_input(grads[0], weight, stride, x.size(2), x.size(3));
    }
    if (ctx->needs_input_grad(1)) {
      gw = call_bwd_weight(grads[0], x, stride);
    }
    return {gx, gw, at::Tensor()};
  }
};

at::Tensor dwconv_fwd_autograd(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  return DwconvFunction::apply(x, weight, stride);
}

}  // namespace

TORCH_LIBRARY_IMPL(pcfast, Autograd, m) { m.impl("dwconv_fwd", &dwconv_fwd_autograd); }

}  // namespace pcfast
