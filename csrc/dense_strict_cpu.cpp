// CPU kernel of strict PC inference on a dense chain (public op and reference in
// pcfast/ops/dense_strict.py, which calls this when built):
//
//   dense_strict_relax_cpu(mu1, weights, biases, values, target, acts, T, rate, sequential, ce,
//                          gram)
//
// The chain: hidden values v_1..v_L (N, d_j); node k (1..L) predicts from v_k with
// z_k = v_k W_k^T + b_k, mu_{k+1} = act_k(z_k); mu_1 (from the clamped input) is fixed; the last
// node's output mu_out meets the target through the output error e_out = target - p,
// p = softmax(mu_out) (ce) or mu_out. g_k = e_{k+1} * act_k'(mu_{k+1}) is the error at node k's
// pre-activation, and every step moves v_j <- v_j - rate (v_j - mu_j - g_j W_j):
// all nodes from one prediction pass (jacobi) or top-down, each on its children's errors at the
// current values (sequential). T steps, values updated in place.
//
// Per step: one matmul forward and one backward per node (the backward accumulates into v_j by
// BLAS beta = 1), and ONE elementwise pass over every node's rows (activation, errors,
// derivative, the value step). With `gram`, the first hidden value is never formed inside the
// loop: its prediction is fixed, so its error moves linearly, e_1 <- q e_1 + rate g_1 W_1
// (q = 1 - rate), and its child reads only s = e_1 W_1^T, which steps as
// s <- q s + rate g_1 (W_1 W_1^T): one (out_1 x out_1) matmul per step instead of the pair
// through W_1; v_1 = mu1 + q^T e_1(0) + rate (sum_t q^(T-1-t) g_1(t)) W_1 at the end.
// Contiguous CPU tensors of one floating dtype (the Python wrapper checks them).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace pcfast {
namespace {

// Activation codes (pcfast/ops/dense_strict.py ACTIVATIONS).
constexpr int64_t kIdentity = 0, kTanh = 1, kReLU = 2, kSigmoid = 3;

// The derivative from the activation's output, as the fast path's rules take it (aten's
// tanh_backward / sigmoid_backward, ReLU where the output is positive).
template <typename acc_t>
inline acc_t act_deriv(int64_t act, acc_t mu) {
  switch (act) {
    case kTanh: return acc_t(1) - mu * mu;
    case kReLU: return mu > acc_t(0) ? acc_t(1) : acc_t(0);
    case kSigmoid: return (acc_t(1) - mu) * mu;
    default: return acc_t(1);
  }
}

// z <- act(z) in place: aten's vectorised kernels (a scalar std::tanh per element would cost
// more than the step's matmuls).
void activate(int64_t act, at::Tensor& z) {
  switch (act) {
    case kTanh: z.tanh_(); break;
    case kReLU: z.relu_(); break;
    case kSigmoid: z.sigmoid_(); break;
    default: break;
  }
}

// Node k's child error over a flat range: buf holds the prediction mu_{k+1} and becomes
// g_k = (v - mu) act'(mu), v = v_{k+1}; STEP: v <- v - rate (v - mu), the own-error part of its
// step; ACCUM (the Gram state): h <- q h + g. Branch-free with the activation a template
// parameter and restrict pointers, so that GCC vectorises it (a switch per element did not:
// ~50 us per jacobi step of the benchmark MLP, a third of its matmuls' time).
template <typename scalar_t, typename acc_t, int64_t ACT, bool STEP, bool ACCUM>
void child_error_range(scalar_t* __restrict__ buf, scalar_t* __restrict__ v,
                       scalar_t* __restrict__ h, int64_t n, acc_t rate, acc_t q) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t mu = buf[i];
    const acc_t x = v[i];
    const acc_t e = x - mu;
    const acc_t g = e * act_deriv<acc_t>(ACT, mu);
    buf[i] = static_cast<scalar_t>(g);
    if constexpr (STEP) v[i] = static_cast<scalar_t>(x - rate * e);
    if constexpr (ACCUM) h[i] = static_cast<scalar_t>(q * static_cast<acc_t>(h[i]) + g);
  }
}

template <typename scalar_t, typename acc_t, bool STEP, bool ACCUM>
void child_error_act(int64_t act, scalar_t* buf, scalar_t* v, scalar_t* h, int64_t n, acc_t rate,
                     acc_t q) {
  switch (act) {
    case kTanh: child_error_range<scalar_t, acc_t, kTanh, STEP, ACCUM>(buf, v, h, n, rate, q); break;
    case kReLU: child_error_range<scalar_t, acc_t, kReLU, STEP, ACCUM>(buf, v, h, n, rate, q); break;
    case kSigmoid:
      child_error_range<scalar_t, acc_t, kSigmoid, STEP, ACCUM>(buf, v, h, n, rate, q);
      break;
    default: child_error_range<scalar_t, acc_t, kIdentity, STEP, ACCUM>(buf, v, h, n, rate, q);
  }
}

template <typename scalar_t, typename acc_t>
void child_error(int64_t act, bool step, scalar_t* buf, scalar_t* v, scalar_t* h, int64_t n,
                 acc_t rate, acc_t q) {
  if (step) {
    if (h != nullptr) child_error_act<scalar_t, acc_t, true, true>(act, buf, v, h, n, rate, q);
    else child_error_act<scalar_t, acc_t, true, false>(act, buf, v, h, n, rate, q);
  } else {
    if (h != nullptr) child_error_act<scalar_t, acc_t, false, true>(act, buf, v, h, n, rate, q);
    else child_error_act<scalar_t, acc_t, false, false>(act, buf, v, h, n, rate, q);
  }
}

// A value's own-error step over a flat range: v <- v - rate (v - mu).
template <typename scalar_t, typename acc_t>
void own_step(scalar_t* __restrict__ v, const scalar_t* __restrict__ mu, int64_t n, acc_t rate) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = v[i];
    v[i] = static_cast<scalar_t>(x - rate * (x - static_cast<acc_t>(mu[i])));
  }
}

// Output error at the last node's pre-activation, one row: buf holds mu_out and becomes
// (target - p) act'(mu_out), p = softmax(mu_out) (ce) or mu_out.
template <typename scalar_t, typename acc_t>
inline void output_row(int64_t act, scalar_t* buf, const scalar_t* target, int64_t n, bool ce) {
  acc_t mx = acc_t(0), total = acc_t(0);
  if (ce) {
    mx = buf[0];
    for (int64_t i = 1; i < n; ++i) mx = std::max<acc_t>(mx, buf[i]);
    for (int64_t i = 0; i < n; ++i) total += std::exp(static_cast<acc_t>(buf[i]) - mx);
  }
  for (int64_t i = 0; i < n; ++i) {
    const acc_t mu = buf[i];
    const acc_t p = ce ? std::exp(mu - mx) / total : mu;
    buf[i] = static_cast<scalar_t>((static_cast<acc_t>(target[i]) - p) * act_deriv<acc_t>(act, mu));
  }
}

// z = v W^T + b into out; wt is W^T, a view or (for a layer with few outputs) a contiguous copy:
// the bias added after the matmul ran faster than addmm with a broadcast bias, which copies the
// expanded bias first (76 vs 90 us for the benchmark MLP's (128, 256) x (256, 256) on the 2-core
// CPU), and a contiguous W^T made the (128, 256) x (256, 10) output layer 10 instead of 17 us,
// while copying a (256, 256) W^T costs more than it saves.
constexpr int64_t kContiguousWtMaxOut = 32;

void predict_into(at::Tensor out, const at::Tensor& v, const at::Tensor& wt,
                  const std::optional<at::Tensor>& b) {
  at::mm_out(out, v, wt);
  if (b.has_value()) out.add_(*b);
}

void check_operand(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "dense_strict_relax: ", name,
              " has dtype ", t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "dense_strict_relax: ", name,
              " must be a contiguous CPU tensor");
}

void dense_strict_relax_cpu(const at::Tensor& mu1, at::TensorList weights,
                            const c10::List<std::optional<at::Tensor>>& biases,
                            at::TensorList values, const at::Tensor& target, at::IntArrayRef acts,
                            int64_t T, double rate, bool sequential, bool ce, bool gram) {
  const int64_t L = static_cast<int64_t>(values.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(weights.size()) == L &&
                  static_cast<int64_t>(biases.size()) == L &&
                  static_cast<int64_t>(acts.size()) == L,
              "dense_strict_relax: one weight, bias and activation per hidden value expected, got ",
              weights.size(), ", ", biases.size(), ", ", acts.size(), " for ", L, " values");
  TORCH_CHECK(T >= 0, "dense_strict_relax: T must be >= 0, got ", T);
  const at::Tensor& v1 = values[0];
  TORCH_CHECK(v1.dim() == 2, "dense_strict_relax: values must be (N, features), got ", v1.sizes());
  const int64_t N = v1.size(0);
  check_operand(mu1, v1, "mu1");
  TORCH_CHECK(mu1.sizes() == v1.sizes(), "dense_strict_relax: mu1 ", mu1.sizes(),
              " does not match the first value ", v1.sizes());
  std::vector<at::Tensor> bufs;  // bufs[k]: node k+1's prediction, then its pre-activation error
  std::vector<std::optional<at::Tensor>> bs;
  std::vector<at::Tensor> wts;  // W_k^T for the forward matmuls
  for (int64_t k = 0; k < L; ++k) {
    const at::Tensor& v = values[k];
    const at::Tensor& w = weights[k];
    check_operand(v, v1, "a value");
    check_operand(w, v1, "a weight");
    TORCH_CHECK(v.dim() == 2 && v.size(0) == N && w.dim() == 2 && w.size(1) == v.size(1),
                "dense_strict_relax: weight ", k, " ", w.sizes(), " does not take value ", k, " ",
                v.sizes());
    const int64_t out = w.size(0);
    if (k + 1 < L) {
      TORCH_CHECK(values[k + 1].dim() == 2 && values[k + 1].size(1) == out,
                  "dense_strict_relax: weight ", k, " gives ", out,
                  " features, the next value has ", values[k + 1].sizes());
    } else {
      TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == out,
                  "dense_strict_relax: target ", target.sizes(), " does not match the output (",
                  N, ", ", out, ")");
      check_operand(target, v1, "target");
    }
    std::optional<at::Tensor> b = biases.get(k);
    if (b.has_value()) {
      check_operand(*b, v1, "a bias");
      TORCH_CHECK(b->dim() == 1 && b->size(0) == out, "dense_strict_relax: bias ", k, " ",
                  b->sizes(), " does not match weight ", w.sizes());
    }
    TORCH_CHECK(acts[k] >= kIdentity && acts[k] <= kSigmoid,
                "dense_strict_relax: unknown activation code ", acts[k]);
    bs.push_back(b);
    bufs.push_back(at::empty({N, out}, v1.options()));
    wts.push_back(out <= kContiguousWtMaxOut ? w.t().contiguous() : w.t());
  }
  if (T == 0) return;
  const double q = 1.0 - rate;

  // Gram state of the first hidden value: s = e_1 W_1^T, c = mu1 W_1^T + b_1, h = sum q^.. g_1.
  at::Tensor e0, gram_w, s, c, h;
  bool start_at_mu1 = false;  // e_1(0) = 0, as from the feedforward pass: s(0) = 0
  if (gram) {
    const at::Tensor& w1 = weights[0];
    start_at_mu1 = at::equal(values[0], mu1);
    gram_w = at::mm(w1, w1.t());
    if (start_at_mu1) {
      s = at::zeros({N, w1.size(0)}, v1.options());
    } else {
      e0 = values[0].sub(mu1);
      s = at::mm(e0, w1.t());
    }
    c = at::empty_like(s);
    predict_into(c, mu1, wts[0], bs[0]);
    h = at::zeros_like(s);
  }

  AT_DISPATCH_FLOATING_TYPES(v1.scalar_type(), "dense_strict_relax", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t r = static_cast<acc_t>(rate);
    const acc_t qa = static_cast<acc_t>(q);
    const scalar_t* tp = target.const_data_ptr<scalar_t>();
    const int64_t C = bufs[L - 1].size(1);
    // Rows [begin, end) of node k's buffer: prediction -> error at the pre-activation (and the
    // child's own-error step with `step_child`; the Gram sum for node 1 under gram).
    auto node_rows = [&](int64_t k, int64_t begin, int64_t end, bool step_child) {
      const int64_t n = bufs[k].size(1);
      scalar_t* z = bufs[k].mutable_data_ptr<scalar_t>();
      if (k + 1 < L) {
        scalar_t* hp = (k == 0 && gram) ? h.mutable_data_ptr<scalar_t>() + begin * n : nullptr;
        child_error<scalar_t, acc_t>(acts[k], step_child, z + begin * n,
                                     values[k + 1].mutable_data_ptr<scalar_t>() + begin * n, hp,
                                     (end - begin) * n, r, qa);
        return;
      }
      for (int64_t row = begin; row < end; ++row)
        output_row<scalar_t, acc_t>(acts[k], z + row * n, tp + row * C, n, ce);
      if (k == 0 && gram) {  // a single hidden value: its child is the output node
        scalar_t* hp = h.mutable_data_ptr<scalar_t>();
        for (int64_t i = begin * n; i < end * n; ++i)
          hp[i] = static_cast<scalar_t>(qa * static_cast<acc_t>(hp[i]) + static_cast<acc_t>(z[i]));
      }
    };
    // Value j's own-error step against its prediction (mu1 for the first), rows [begin, end).
    auto own_rows = [&](int64_t j, int64_t begin, int64_t end) {
      const int64_t n = values[j].size(1);
      const scalar_t* mp = (j == 0 ? mu1 : bufs[j - 1]).const_data_ptr<scalar_t>();
      own_step<scalar_t, acc_t>(values[j].mutable_data_ptr<scalar_t>() + begin * n,
                                mp + begin * n, (end - begin) * n, r);
    };
    const int64_t grain = std::max<int64_t>(1, N / std::max(1, at::get_num_threads()));
    // The backward half of node k's step: v_k += rate g_k W_k (gram: s, for the first node).
    auto back = [&](int64_t k) {
      if (k == 0 && gram) {
        s.addmm_(bufs[0], gram_w, q, rate);
      } else {
        values[k].addmm_(bufs[k], weights[k], 1.0, rate);
      }
    };
    auto forward = [&](int64_t k) {  // bufs[k] = act_k(z_k), the prediction node k makes
      if (k == 0 && gram) {
        at::add_out(bufs[0], c, s);
      } else {
        predict_into(bufs[k], values[k], wts[k], bs[k]);
      }
      activate(acts[k], bufs[k]);
    };

    for (int64_t t = 0; t < T; ++t) {
      if (!sequential) {
        for (int64_t k = 0; k < L; ++k) forward(k);
        at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
          for (int64_t k = 0; k < L; ++k) node_rows(k, begin, end, true);
          if (!gram) own_rows(0, begin, end);
        });
        for (int64_t k = 0; k < L; ++k) back(k);
      } else {
        // Top-down: value j (0-based: values[j]) moves on its own error against bufs[j-1]'s
        // prediction and on node j's error at the current values.
        for (int64_t j = L - 1; j >= 0; --j) {
          if (j == L - 1) forward(j);  // the output node's prediction at the current v_L
          // bufs[j] holds mu_{j+2} (or mu_out) at the current values: form g_j.
          if (j > 0) {  // own prediction mu_{j+1} from values[j-1]
            forward(j - 1);
          }
          at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
            node_rows(j, begin, end, false);
            if (j > 0 || !gram) own_rows(j, begin, end);
          });
          back(j);
        }
      }
    }
  });

  if (gram) {  // v_1 = mu1 + q^T e_1(0) + rate h W_1
    at::Tensor v = values[0];
    v.copy_(mu1);
    if (!start_at_mu1) v.add_(e0, std::pow(q, static_cast<double>(T)));
    v.addmm_(h, weights[0], 1.0, rate);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pcfast, m) {
  m.def(
      "dense_strict_relax_cpu(Tensor mu1, Tensor[] weights, Tensor?[] biases, Tensor(a!)[] values, "
      "Tensor target, int[] acts, int T, float rate, bool sequential, bool ce, bool gram) -> ()");
}

TORCH_LIBRARY_IMPL(pcfast, CPU, m) { m.impl("dense_strict_relax_cpu", &dense_strict_relax_cpu); }

}  // namespace pcfast
