// CPU kernels of the fast PC backend's fused per-step ops (public ops and references in
// pcfast/ops/pc_relax.py and pcfast/ops/dw_bn_relu_vjp.py, which call these when built):
//
//   pc_relax_cpu(e, backs, rate, clamp, out):       out = lerp(e, clamp(sum(backs)), rate)
//   dw_bn_relu_vjp_cpu(g, z, dead, gamma, mean, invstd, weight, stride, in_h, in_w) -> dx
//       dx = dwconv_bwd_input(bn_train_vjp(g masked by !dead)), the input-VJP of
//       ReLU(BN_train(dual_path_dwconv(x))) in one pass per plane;
//   dw_bn_relu_vjp_relax_cpu(..., stride, e, other, rate, clamp, out)
//       the same, with the PC update of the node it feeds as epilogue:
//       out = lerp(e, clamp(dx + other), rate);
//   add_relu_vjp_relax_cpu / concat_relu_vjp_relax_cpu: the merges' masked errors with the
//       update of the parents whose last contribution they are;
//   conv1x1_vjp_relax_cpu: W^T g (matmul) + the update epilogue.
//
// BN train VJP (M = N*H*W per channel, xhat = (z - mean) * invstd, dy = g * [out > 0]):
//   dz = gamma * invstd * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M).
// lerp as torch.lerp: w < 0.5 ? a + w (b - a) : b - (b - a)(1 - w).
// Contiguous NCHW tensors of one floating dtype (the Python wrappers ensure it); accumulation
// in at::opmath_type.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "dw3x3_cpu.h"

namespace pcfast {
namespace {

template <typename acc_t>
inline acc_t lerp_like_torch(acc_t a, acc_t b, acc_t w) {
  return w < acc_t(0.5) ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w);
}

template <typename acc_t>
inline acc_t relax_value(acc_t e, acc_t b, acc_t rate, bool has_clamp, acc_t clamp) {
  if (has_clamp) b = std::min(std::max(b, -clamp), clamp);
  return rate == acc_t(1) ? b : lerp_like_torch(e, b, rate);
}

// out[i] = relax(e[i], sum_k b_k[i]) for i in [0, n). The number of summands and the settings
// are template parameters so that the loop body has no branch and no inner loop: GCC then
// vectorizes it (with a run-time check that out does not overlap the inputs; an exact alias
// such as out == e takes the scalar loop, which is still correct element by element). A loop
// over a runtime count of `backs` ran scalar at ~2.8 ns per float, 10x torch.lerp.
template <typename scalar_t, typename acc_t, int NB, bool CLAMP, bool LOW, bool ONE>
void relax_loop(const scalar_t* ep, const scalar_t* b0, const scalar_t* b1, const scalar_t* b2,
                const scalar_t* b3, scalar_t* op, int64_t n, acc_t r, acc_t c) {
  for (int64_t i = 0; i < n; ++i) {
    // Sum in e's dtype, as the reference does (b = b0 + b1 + ...).
    scalar_t bs = b0[i];
    if constexpr (NB > 1) bs = static_cast<scalar_t>(static_cast<acc_t>(bs) + static_cast<acc_t>(b1[i]));
    if constexpr (NB > 2) bs = static_cast<scalar_t>(static_cast<acc_t>(bs) + static_cast<acc_t>(b2[i]));
    if constexpr (NB > 3) bs = static_cast<scalar_t>(static_cast<acc_t>(bs) + static_cast<acc_t>(b3[i]));
    acc_t b = static_cast<acc_t>(bs);
    if constexpr (CLAMP) b = std::min(std::max(b, -c), c);
    const acc_t ev = static_cast<acc_t>(ep[i]);
    acc_t v;
    if constexpr (ONE) {
      v = b;
    } else if constexpr (LOW) {
      v = ev + r * (b - ev);
    } else {
      v = b - (b - ev) * (acc_t(1) - r);
    }
    op[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t, int NB>
void relax_nb(const scalar_t* ep, const scalar_t* const* bp, scalar_t* op, int64_t begin,
              int64_t end, acc_t r, bool has_clamp, acc_t c) {
  const bool one = r == acc_t(1), low = r < acc_t(0.5);
  const scalar_t* b[4] = {nullptr, nullptr, nullptr, nullptr};
  for (int k = 0; k < NB; ++k) b[k] = bp[k] + begin;
  const int64_t n = end - begin;
#define PCFAST_RELAX(CL, LO, ON) \
  relax_loop<scalar_t, acc_t, NB, CL, LO, ON>(ep + begin, b[0], b[1], b[2], b[3], op + begin, n, r, c)
  if (has_clamp) {
    if (one) PCFAST_RELAX(true, false, true);
    else if (low) PCFAST_RELAX(true, true, false);
    else PCFAST_RELAX(true, false, false);
  } else {
    if (one) PCFAST_RELAX(false, false, true);
    else if (low) PCFAST_RELAX(false, true, false);
    else PCFAST_RELAX(false, false, false);
  }
#undef PCFAST_RELAX
}

// out[i] = relax(e[i], sum_k bp[k][i]) over [begin, end), 1 <= nb <= 4.
template <typename scalar_t, typename acc_t>
void relax_range(const scalar_t* ep, const scalar_t* const* bp, int nb, scalar_t* op,
                 int64_t begin, int64_t end, acc_t r, bool has_clamp, acc_t c) {
  switch (nb) {
    case 1: relax_nb<scalar_t, acc_t, 1>(ep, bp, op, begin, end, r, has_clamp, c); break;
    case 2: relax_nb<scalar_t, acc_t, 2>(ep, bp, op, begin, end, r, has_clamp, c); break;
    case 3: relax_nb<scalar_t, acc_t, 3>(ep, bp, op, begin, end, r, has_clamp, c); break;
    case 4: relax_nb<scalar_t, acc_t, 4>(ep, bp, op, begin, end, r, has_clamp, c); break;
    default: TORCH_CHECK(false, "pcfast relax: 1 to 4 summands, got ", nb);
  }
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "pcfast fused op: ", name, " has shape ", t.sizes(),
              ", expected ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "pcfast fused op: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "pcfast fused op: ", name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), "pcfast fused op: ", name, " must be a CPU tensor");
}

void pc_relax_cpu(const at::Tensor& e, at::TensorList backs, double rate,
                  std::optional<double> clamp, const at::Tensor& out) {
  TORCH_CHECK(!backs.empty(), "pc_relax needs at least one propagated error");
  TORCH_CHECK(backs.size() <= 4, "pc_relax_cpu sums at most 4 propagated errors, got ",
              backs.size());
  check_same(e, e, "e");
  check_same(out, e, "out");
  for (const auto& b : backs) check_same(b, e, "back");
  const int64_t n = e.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "pc_relax_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    const scalar_t* bp[4] = {nullptr, nullptr, nullptr, nullptr};
    for (size_t i = 0; i < backs.size(); ++i) bp[i] = backs[i].const_data_ptr<scalar_t>();
    const int nb = static_cast<int>(backs.size());
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t r = static_cast<acc_t>(rate);
    const bool has_clamp = clamp.has_value();
    const acc_t c = has_clamp ? static_cast<acc_t>(*clamp) : acc_t(0);
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      relax_range<scalar_t, acc_t>(ep, bp, nb, op, begin, end, r, has_clamp, c);
    });
  });
}

// The loops of dw_bn_relu_core, as free functions over restrict pointers so that the compiler
// vectorizes them (inside the dispatch lambdas every pointer is a captured reference that a
// store might alias, which blocks vectorization).

// out = dead ? 0 : e (a select, so a dead position is exactly 0 whatever e holds).
template <typename scalar_t>
void mask_dead(const scalar_t* __restrict e, const uint8_t* __restrict dead, int64_t n,
               scalar_t* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t v = e[i];
    out[i] = dead[i] ? scalar_t(0) : v;
  }
}

// s1 += sum(dy), s2 += sum(dy * xhat) over one plane, dy = dead ? 0 : g: the select first,
// into `scratch` (n values), then 8 partial sums per quantity so that the loop vectorizes
// without reassociating a single sum.
template <typename scalar_t, typename acc_t>
void bn_relu_plane_sums(const scalar_t* __restrict g, const scalar_t* __restrict z,
                        const uint8_t* __restrict dead, int64_t n, acc_t mean, acc_t invstd,
                        acc_t* __restrict scratch, acc_t& s1, acc_t& s2) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t gv = static_cast<acc_t>(g[i]);
    scratch[i] = dead[i] ? acc_t(0) : gv;
  }
  acc_t p1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, p2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const acc_t dy = scratch[i + j];
      p1[j] += dy;
      p2[j] += dy * ((static_cast<acc_t>(z[i + j]) - mean) * invstd);
    }
  }
  for (; i < n; ++i) {
    p1[0] += scratch[i];
    p2[0] += scratch[i] * ((static_cast<acc_t>(z[i]) - mean) * invstd);
  }
  for (int j = 0; j < 8; ++j) {
    s1 += p1[j];
    s2 += p2[j];
  }
}

// One row of the BN-train + ReLU input-VJP: out = scale * (dy - a1 - xhat * a2), rounded to the
// tensor dtype as the unfused ops do between the two VJPs.
template <typename scalar_t, typename acc_t>
void bn_relu_vjp_row(const scalar_t* __restrict g, const scalar_t* __restrict z,
                     const uint8_t* __restrict dead, int64_t n, acc_t mean, acc_t invstd,
                     acc_t scale, acc_t a1, acc_t a2, acc_t* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t gv = static_cast<acc_t>(g[i]);
    const acc_t dy = dead[i] ? acc_t(0) : gv;
    const acc_t xhat = (static_cast<acc_t>(z[i]) - mean) * invstd;
    out[i] = static_cast<acc_t>(static_cast<scalar_t>(scale * (dy - a1 - xhat * a2)));
  }
}

// The core of both dw_bn_relu_vjp ops. With `e` defined, writes the relaxed error into `out`.
void dw_bn_relu_core(const at::Tensor& g, const at::Tensor& z, const at::Tensor& dead,
                     const std::optional<at::Tensor>& gamma, const at::Tensor& mean,
                     const at::Tensor& invstd, const at::Tensor& weight, int64_t stride,
                     const at::Tensor& out, const at::Tensor& e, const at::Tensor& other,
                     const at::Tensor& other_dead, double rate, std::optional<double> clamp) {
  TORCH_CHECK(g.dim() == 4, "dw_bn_relu_vjp expects (N, C, H, W) tensors, got ", g.dim(), "-D");
  check_same(g, g, "g");
  check_same(z, g, "z");
  TORCH_CHECK(dead.sizes() == g.sizes() && dead.scalar_type() == at::kBool && dead.is_contiguous(),
              "dw_bn_relu_vjp: dead must be a contiguous bool tensor of g's shape");
  const int64_t N = g.size(0), C = g.size(1), Ho = g.size(2), Wo = g.size(3);
  const int64_t H = out.size(2), W = out.size(3);
  TORCH_CHECK(stride == 1 || stride == 2, "dw_bn_relu_vjp supports stride 1 or 2, got ", stride);
  TORCH_CHECK((H - 1) / stride + 1 == Ho && (W - 1) / stride + 1 == Wo,
              "dw_bn_relu_vjp: input size (", H, ", ", W, ") with stride ", stride,
              " does not give g's spatial size (", Ho, ", ", Wo, ")");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 2 * C && weight.size(2) == 3 &&
                  weight.size(3) == 3 && weight.is_contiguous(),
              "dw_bn_relu_vjp expects a contiguous (2C, 1, 3, 3) weight, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == g.scalar_type(), "dw_bn_relu_vjp: weight dtype ",
              weight.scalar_type(), " differs from g's ", g.scalar_type());
  TORCH_CHECK(out.size(0) == N && out.size(1) == C && out.is_contiguous() &&
                  out.scalar_type() == g.scalar_type(),
              "dw_bn_relu_vjp: out must be a contiguous (N, C, H, W) tensor of g's dtype");
  const bool relax = e.defined();
  if (relax) {
    check_same(e, out, "e");
    if (other.defined()) check_same(other, out, "other");
    TORCH_CHECK(!other_dead.defined() ||
                    (other.defined() && other_dead.sizes() == other.sizes() &&
                     other_dead.scalar_type() == at::kBool && other_dead.is_contiguous()),
                "dw_bn_relu_vjp_relax: other_dead must be a contiguous bool tensor of other's "
                "shape (and other given)");
  }
  const auto acc_type = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor mean_a = mean.to(acc_type).contiguous();
  const at::Tensor invstd_a = invstd.to(acc_type).contiguous();
  at::Tensor scale = gamma.has_value() && gamma->defined()
                         ? at::mul(gamma->to(acc_type), invstd_a).contiguous()
                         : invstd_a;
  const int64_t HWo = Ho * Wo, HW = H * W;
  const double M = static_cast<double>(N * HWo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dw_bn_relu_vjp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    // Masks as bytes: loops over bool loads do not vectorize with GCC.
    const uint8_t* dp = reinterpret_cast<const uint8_t*>(dead.const_data_ptr<bool>());
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const acc_t* mp = mean_a.const_data_ptr<acc_t>();
    const acc_t* ip = invstd_a.const_data_ptr<acc_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t* ep = relax ? e.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = relax && other.defined() ? other.const_data_ptr<scalar_t>() : nullptr;
    const uint8_t* xdp = xp && other_dead.defined()
                             ? reinterpret_cast<const uint8_t*>(other_dead.const_data_ptr<bool>())
                             : nullptr;
    const acc_t r = static_cast<acc_t>(rate);
    const bool has_clamp = clamp.has_value();
    const acc_t cl = has_clamp ? static_cast<acc_t>(*clamp) : acc_t(0);
    // Phase 1: per-channel sums of dy and dy * xhat.
    std::vector<acc_t> k1(C), k2(C);
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(HWo);
      for (int64_t c = begin; c < end; ++c) {
        acc_t s1 = 0, s2 = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * C + c) * HWo;
          bn_relu_plane_sums<scalar_t, acc_t>(gp + base, zp + base, dp + base, HWo, mp[c], ip[c],
                                               scratch.data(), s1, s2);
        }
        k1[c] = s1 / static_cast<acc_t>(M);
        k2[c] = s2 / static_cast<acc_t>(M);
      }
    });
    // Phase 2: per plane, dz (zero border of 1), the transposed dual-path conv with the summed
    // kernel as a gather, then the write or the relax epilogue.
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      const int64_t Wp = Wo + 2;
      std::vector<acc_t> dz((Ho + 2) * Wp, acc_t(0)), gx(HW);
      std::vector<scalar_t> rounded(HW), masked(xdp ? HW : 0);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const int64_t base = p * HWo;
        for (int64_t oy = 0; oy < Ho; ++oy) {
          const int64_t at_row = base + oy * Wo;
          bn_relu_vjp_row<scalar_t, acc_t>(gp + at_row, zp + at_row, dp + at_row, Wo, mp[c],
                                            ip[c], sp[c], k1[c], k2[c],
                                            dz.data() + (oy + 1) * Wp + 1);
        }
        acc_t k[9];
        for (int t = 0; t < 9; ++t) {
          k[t] = static_cast<acc_t>(wp[2 * c * 9 + t]) + static_cast<acc_t>(wp[(2 * c + 1) * 9 + t]);
        }
        if (stride == 1) {
          transposed_dw3x3_s1<acc_t>(dz.data(), k, H, W, gx.data());
        } else {
          transposed_dw3x3_s2<acc_t>(dz.data(), k, Ho, Wo, H, W, gx.data());
        }
        // gx rounded to the dtype (the unfused VJP's result), then written or relaxed.
        scalar_t* o = op + p * HW;
        scalar_t* tmp = relax ? rounded.data() : o;
        for (int64_t i = 0; i < HW; ++i) tmp[i] = static_cast<scalar_t>(gx[i]);
        if (relax) {
          const scalar_t* xplane = xp ? xp + p * HW : nullptr;
          if (xdp) {  // other * [other_dead == 0], as the unfused masked_fill gives it
            mask_dead<scalar_t>(xplane, xdp + p * HW, HW, masked.data());
            xplane = masked.data();
          }
          const scalar_t* bp2[2] = {tmp, xplane};
          relax_range<scalar_t, acc_t>(ep + p * HW, bp2, xp ? 2 : 1, o, 0, HW, r, has_clamp, cl);
        }
      }
    });
  });
}

at::Tensor dw_bn_relu_vjp_cpu(const at::Tensor& g, const at::Tensor& z, const at::Tensor& dead,
                              const std::optional<at::Tensor>& gamma, const at::Tensor& mean,
                              const at::Tensor& invstd, const at::Tensor& weight, int64_t stride,
                              int64_t in_h, int64_t in_w) {
  TORCH_CHECK(g.dim() == 4, "dw_bn_relu_vjp expects (N, C, H, W) tensors, got ", g.dim(), "-D");
  at::Tensor out = at::empty({g.size(0), g.size(1), in_h, in_w}, g.options());
  dw_bn_relu_core(g, z, dead, gamma, mean, invstd, weight, stride, out, at::Tensor(),
                  at::Tensor(), at::Tensor(), 1.0, std::nullopt);
  return out;
}

void dw_bn_relu_vjp_relax_cpu(const at::Tensor& g, const at::Tensor& z, const at::Tensor& dead,
                              const std::optional<at::Tensor>& gamma, const at::Tensor& mean,
                              const at::Tensor& invstd, const at::Tensor& weight, int64_t stride,
                              const at::Tensor& e, const std::optional<at::Tensor>& other,
                              const std::optional<at::Tensor>& other_dead, double rate,
                              std::optional<double> clamp, const at::Tensor& out) {
  dw_bn_relu_core(g, z, dead, gamma, mean, invstd, weight, stride, out, e,
                  other.has_value() ? *other : at::Tensor(),
                  other_dead.has_value() ? *other_dead : at::Tensor(), rate, clamp);
}


// ReLU(a + b) merge: g = e * [out > 0] goes to both parents; parent a (the block's last
// sub-layer, whose only child is the merge) is relaxed here: out_a = relax(e_a, g). Returns g
// (store_g), or an empty tensor where parent b reads e and the mask itself.
at::Tensor add_relu_vjp_relax_cpu(const at::Tensor& e, const at::Tensor& dead,
                                  const at::Tensor& e_a, double rate, std::optional<double> clamp,
                                  const at::Tensor& out_a, bool store_g) {
  check_same(e, e, "e");
  check_same(e_a, e, "e_a");
  check_same(out_a, e, "out_a");
  TORCH_CHECK(dead.sizes() == e.sizes() && dead.scalar_type() == at::kBool && dead.is_contiguous(),
              "add_relu_vjp_relax: dead must be a contiguous bool tensor of e's shape");
  at::Tensor g = store_g ? at::empty_like(e) : at::empty({0}, e.options());
  const int64_t n = e.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "add_relu_vjp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    const uint8_t* dp = reinterpret_cast<const uint8_t*>(dead.const_data_ptr<bool>());
    const scalar_t* ap = e_a.const_data_ptr<scalar_t>();
    scalar_t* gp = store_g ? g.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out_a.mutable_data_ptr<scalar_t>();
    const acc_t r = static_cast<acc_t>(rate);
    const bool has_clamp = clamp.has_value();
    const acc_t c = has_clamp ? static_cast<acc_t>(*clamp) : acc_t(0);
    constexpr int64_t kChunk = 4096;  // without g: masked in cache-sized pieces
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      if (gp) {
        mask_dead<scalar_t>(ep + begin, dp + begin, end - begin, gp + begin);
        const scalar_t* bp[1] = {gp};
        relax_range<scalar_t, acc_t>(ap, bp, 1, op, begin, end, r, has_clamp, c);
        return;
      }
      std::vector<scalar_t> piece(std::min(kChunk, end - begin));
      for (int64_t s = begin; s < end; s += kChunk) {
        const int64_t len = std::min(kChunk, end - s);
        mask_dead<scalar_t>(ep + s, dp + s, len, piece.data());
        const scalar_t* bp[1] = {piece.data()};
        relax_range<scalar_t, acc_t>(ap + s, bp, 1, op + s, 0, len, r, has_clamp, c);
      }
    });
  });
  return g;
}

// ReLU(cat(a, b)) merge: both parents' only child is the merge, so both are relaxed here:
// out_a = relax(e_a, e[:, :Ca] * mask), out_b = relax(e_b, e[:, Ca:] * mask).
void concat_relu_vjp_relax_cpu(const at::Tensor& e, const at::Tensor& dead, const at::Tensor& e_a,
                               const at::Tensor& e_b, double rate, std::optional<double> clamp,
                               const at::Tensor& out_a, const at::Tensor& out_b) {
  check_same(e, e, "e");
  TORCH_CHECK(dead.sizes() == e.sizes() && dead.scalar_type() == at::kBool && dead.is_contiguous(),
              "concat_relu_vjp_relax: dead must be a contiguous bool tensor of e's shape");
  check_same(out_a, e_a, "out_a");
  check_same(out_b, e_b, "out_b");
  check_same(e_a, e_a, "e_a");
  check_same(e_b, e_b, "e_b");
  const int64_t N = e.size(0), Ca = e_a.size(1), Cb = e_b.size(1);
  const int64_t HW = e.numel() / (N * (Ca + Cb));
  TORCH_CHECK(e.size(1) == Ca + Cb && e_a.numel() == N * Ca * HW && e_b.numel() == N * Cb * HW,
              "concat_relu_vjp_relax: channel split does not match e");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "concat_relu_vjp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    const uint8_t* dp = reinterpret_cast<const uint8_t*>(dead.const_data_ptr<bool>());
    const acc_t r = static_cast<acc_t>(rate);
    const bool has_clamp = clamp.has_value();
    const acc_t c = has_clamp ? static_cast<acc_t>(*clamp) : acc_t(0);
    // One (sample, half) block of channels at a time: rows of e are contiguous per sample.
    at::parallel_for(0, 2 * N, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> g;
      for (int64_t q = begin; q < end; ++q) {
        const int64_t n = q / 2;
        const bool second = q % 2;
        const int64_t cs = second ? Cb : Ca, len = cs * HW;
        const int64_t src = (n * (Ca + Cb) + (second ? Ca : 0)) * HW;
        const scalar_t* dst_e = (second ? e_b : e_a).const_data_ptr<scalar_t>() + n * len;
        scalar_t* dst_o = (second ? out_b : out_a).mutable_data_ptr<scalar_t>() + n * len;
        g.resize(len);
        mask_dead<scalar_t>(ep + src, dp + src, len, g.data());
        const scalar_t* bp[1] = {g.data()};
        relax_range<scalar_t, acc_t>(dst_e, bp, 1, dst_o, 0, len, r, has_clamp, c);
      }
    });
  });
}

// 1x1 stride-1 conv input-VJP W^T g (a batched matmul) with the relax epilogue:
// out = relax(e, W^T g + other). wt: (C_in, C_out).
void conv1x1_vjp_relax_cpu(const at::Tensor& g, const at::Tensor& wt, const at::Tensor& e,
                           const std::optional<at::Tensor>& other, double rate,
                           std::optional<double> clamp, const at::Tensor& out) {
  TORCH_CHECK(g.dim() == 4 && wt.dim() == 2 && wt.size(1) == g.size(1),
              "conv1x1_vjp_relax: g (N, C_out, H, W) and wt (C_in, C_out) expected");
  check_same(out, e, "out");
  check_same(e, e, "e");
  const int64_t N = g.size(0), HW = g.size(2) * g.size(3);
  at::Tensor gx = at::matmul(wt, g.reshape({N, g.size(1), HW})).contiguous();
  TORCH_CHECK(gx.numel() == e.numel() && gx.scalar_type() == e.scalar_type(),
              "conv1x1_vjp_relax: e does not match the VJP's shape or dtype");
  if (other.has_value()) check_same(*other, e, "other");
  const int64_t n = e.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "conv1x1_vjp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bp[2] = {gx.const_data_ptr<scalar_t>(),
                             other.has_value() ? other->const_data_ptr<scalar_t>() : nullptr};
    const acc_t r = static_cast<acc_t>(rate);
    const bool has_clamp = clamp.has_value();
    const acc_t c = has_clamp ? static_cast<acc_t>(*clamp) : acc_t(0);
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      relax_range<scalar_t, acc_t>(ep, bp, other.has_value() ? 2 : 1, op, begin, end, r,
                                   has_clamp, c);
    });
  });
}

}  // namespace

// CPU-only helper ops behind the public Python ops (which are the ones the engine dispatches).
TORCH_LIBRARY_FRAGMENT(pcfast, m) {
  m.def("pc_relax_cpu(Tensor e, Tensor[] backs, float rate, float? clamp, Tensor(a!) out) -> ()");
  m.def(
      "dw_bn_relu_vjp_cpu(Tensor g, Tensor z, Tensor dead, Tensor? gamma, Tensor mean, "
      "Tensor invstd, Tensor weight, int stride, int in_h, int in_w) -> Tensor");
  m.def(
      "dw_bn_relu_vjp_relax_cpu(Tensor g, Tensor z, Tensor dead, Tensor? gamma, Tensor mean, "
      "Tensor invstd, Tensor weight, int stride, Tensor e, Tensor? other, Tensor? other_dead, "
      "float rate, float? clamp, Tensor(a!) out) -> ()");
  m.def(
      "add_relu_vjp_relax_cpu(Tensor e, Tensor dead, Tensor e_a, float rate, float? clamp, "
      "Tensor(a!) out_a, bool store_g=True) -> Tensor");
  m.def(
      "concat_relu_vjp_relax_cpu(Tensor e, Tensor dead, Tensor e_a, Tensor e_b, float rate, "
      "float? clamp, Tensor(a!) out_a, Tensor(b!) out_b) -> ()");
  m.def(
      "conv1x1_vjp_relax_cpu(Tensor g, Tensor wt, Tensor e, Tensor? other, float rate, "
      "float? clamp, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(pcfast, CPU, m) {
  m.impl("pc_relax_cpu", &pc_relax_cpu);
  m.impl("dw_bn_relu_vjp_cpu", &dw_bn_relu_vjp_cpu);
  m.impl("dw_bn_relu_vjp_relax_cpu", &dw_bn_relu_vjp_relax_cpu);
  m.impl("add_relu_vjp_relax_cpu", &add_relu_vjp_relax_cpu);
  m.impl("concat_relu_vjp_relax_cpu", &concat_relu_vjp_relax_cpu);
  m.impl("conv1x1_vjp_relax_cpu", &conv1x1_vjp_relax_cpu);
}

}  // namespace pcfast
