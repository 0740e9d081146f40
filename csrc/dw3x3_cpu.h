// Plane-level loops of the 3x3 depthwise convolution (padding 1, stride 1 or 2) on the CPU,
// shared by the dual-path dwconv ops (dwconv_cpu.cpp) and the fused PC ops (pc_fused_cpu.cpp).
//
// Every loop works on one (H, W) plane held in an opmath buffer with a zero border of 1
// ("padded": (H + 2) x (W + 2), element [y + 1][x + 1] is pixel (y, x)), so that no loop tests
// bounds and each is a gather over restrict pointers that the compiler vectorizes. Free
// functions rather than lambdas: inside the dispatch lambdas every pointer is a captured
// reference that a store might alias, which blocks vectorization.
#pragma once

#include <cstdint>

namespace pcfast {

// padded <- plane (any element strides), converted to acc_t; the border is left as it is (the
// caller zeroes the buffer once).
template <typename scalar_t, typename acc_t>
inline void load_padded(const scalar_t* src, int64_t sh, int64_t sw, int64_t H, int64_t W,
                        acc_t* __restrict padded) {
  const int64_t Wp = W + 2;
  for (int64_t y = 0; y < H; ++y) {
    acc_t* __restrict row = padded + (y + 1) * Wp + 1;
    const scalar_t* s = src + y * sh;
    if (sw == 1) {
      for (int64_t x = 0; x < W; ++x) row[x] = static_cast<acc_t>(s[x]);
    } else {
      for (int64_t x = 0; x < W; ++x) row[x] = static_cast<acc_t>(s[x * sw]);
    }
  }
}

// y[oy, ox] = sum_{ky, kx} k[ky, kx] * x[oy * s - 1 + ky, ox * s - 1 + kx] from padded x.
template <typename acc_t>
inline void dw3x3_fwd_plane(const acc_t* __restrict xp, const acc_t* k, int64_t W, int64_t Ho,
                            int64_t Wo, int64_t stride, acc_t* __restrict y) {
  const int64_t Wp = W + 2;
  const acc_t k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6],
              k7 = k[7], k8 = k[8];
  for (int64_t oy = 0; oy < Ho; ++oy) {
    // Padded rows oy * s + ky for ky = 0, 1, 2.
    const acc_t* __restrict r0 = xp + (oy * stride) * Wp;
    const acc_t* __restrict r1 = r0 + Wp;
    const acc_t* __restrict r2 = r1 + Wp;
    acc_t* __restrict o = y + oy * Wo;
    if (stride == 1) {
      for (int64_t ox = 0; ox < Wo; ++ox) {
        o[ox] = k0 * r0[ox] + k1 * r0[ox + 1] + k2 * r0[ox + 2] + k3 * r1[ox] + k4 * r1[ox + 1] +
                k5 * r1[ox + 2] + k6 * r2[ox] + k7 * r2[ox + 1] + k8 * r2[ox + 2];
      }
    } else {
      for (int64_t ox = 0; ox < Wo; ++ox) {
        const int64_t c = 2 * ox;
        o[ox] = k0 * r0[c] + k1 * r0[c + 1] + k2 * r0[c + 2] + k3 * r1[c] + k4 * r1[c + 1] +
                k5 * r1[c + 2] + k6 * r2[c] + k7 * r2[c + 1] + k8 * r2[c + 2];
      }
    }
  }
}

// Transposed conv, stride 1, as a gather over padded dz ((H + 2) x (W + 2)):
// gx[iy, ix] = sum_{ky, kx} k[ky, kx] * dz[iy + 1 - ky, ix + 1 - kx].
template <typename acc_t>
inline void transposed_dw3x3_s1(const acc_t* __restrict dz, const acc_t* k, int64_t H, int64_t W,
                                acc_t* __restrict gx) {
  const int64_t Wp = W + 2;
  const acc_t k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6],
              k7 = k[7], k8 = k[8];
  for (int64_t iy = 0; iy < H; ++iy) {
    // Padded rows of dz rows iy + 1 - ky for ky = 0, 1, 2.
    const acc_t* __restrict r0 = dz + (iy + 2) * Wp;
    const acc_t* __restrict r1 = dz + (iy + 1) * Wp;
    const acc_t* __restrict r2 = dz + iy * Wp;
    acc_t* __restrict o = gx + iy * W;
    for (int64_t ix = 0; ix < W; ++ix) {
      o[ix] = k0 * r0[ix + 2] + k1 * r0[ix + 1] + k2 * r0[ix] + k3 * r1[ix + 2] +
              k4 * r1[ix + 1] + k5 * r1[ix] + k6 * r2[ix + 2] + k7 * r2[ix + 1] + k8 * r2[ix];
    }
  }
}

// The same for stride 2 (padded dz: (Ho + 2) x (Wo + 2)): input row iy receives from output
// rows oy = (iy + 1 - ky) / 2 where that is whole, i.e. ky = 1 for even iy and ky = 0, 2 for
// odd iy; columns likewise. Rows and columns -1 and Ho / Wo are the zero border.
template <typename acc_t>
inline void transposed_dw3x3_s2(const acc_t* __restrict dz, const acc_t* k, int64_t Ho,
                                int64_t Wo, int64_t H, int64_t W, acc_t* __restrict gx) {
  const int64_t Wp = Wo + 2;
  for (int64_t iy = 0; iy < H; ++iy) {
    acc_t* __restrict o = gx + iy * W;
    for (int64_t ix = 0; ix < W; ++ix) o[ix] = acc_t(0);
    for (int64_t ky = 0; ky < 3; ++ky) {
      if ((iy + 1 - ky) % 2 != 0) continue;
      const int64_t oy = (iy + 1 - ky) / 2;  // in [-1, Ho]
      if (oy < -1 || oy > Ho) continue;
      const acc_t* __restrict row = dz + (oy + 1) * Wp + 1;  // row[ox], ox in [-1, Wo]
      const acc_t ka = k[ky * 3 + 0], kb = k[ky * 3 + 1], kc = k[ky * 3 + 2];
      // even ix = 2j: kx = 1, ox = j; odd ix = 2j + 1: kx = 0 -> ox = j + 1, kx = 2 -> ox = j.
      for (int64_t j = 0; 2 * j < W; ++j) o[2 * j] += kb * row[j];
      for (int64_t j = 0; 2 * j + 1 < W; ++j) o[2 * j + 1] += ka * row[j + 1] + kc * row[j];
    }
  }
}

// acc[ky * 3 + kx] += sum_{oy, ox} g[oy, ox] * x[oy * s - 1 + ky, ox * s - 1 + kx] from padded
// x and a dense (Ho, Wo) g: per tap, per-column partial sums over the rows (a vectorized
// elementwise loop), then one sum over the columns. `cols` holds 9 * Wo values.
template <typename acc_t>
inline void dw3x3_weight_plane(const acc_t* __restrict xp, const acc_t* __restrict g, int64_t W,
                               int64_t Ho, int64_t Wo, int64_t stride, acc_t* __restrict cols,
                               acc_t* acc) {
  const int64_t Wp = W + 2;
  for (int64_t i = 0; i < 9 * Wo; ++i) cols[i] = acc_t(0);
  for (int64_t oy = 0; oy < Ho; ++oy) {
    const acc_t* __restrict gr = g + oy * Wo;
    for (int64_t ky = 0; ky < 3; ++ky) {
      const acc_t* __restrict xr = xp + (oy * stride + ky) * Wp;
      for (int64_t kx = 0; kx < 3; ++kx) {
        acc_t* __restrict c = cols + (ky * 3 + kx) * Wo;
        if (stride == 1) {
          for (int64_t ox = 0; ox < Wo; ++ox) c[ox] += gr[ox] * xr[ox + kx];
        } else {
          for (int64_t ox = 0; ox < Wo; ++ox) c[ox] += gr[ox] * xr[2 * ox + kx];
        }
      }
    }
  }
  for (int t = 0; t < 9; ++t) {
    acc_t s = 0;
    for (int64_t ox = 0; ox < Wo; ++ox) s += cols[t * Wo + ox];
    acc[t] += s;
  }
}

}  // namespace pcfast
