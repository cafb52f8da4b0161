// Fused attention stem (paper Sec. 3.2): block attention inside each 4x4 block of the image,
// forward (optionally through eval-mode BN and the 4x4 max-pool) and a recomputing backward.
// See sasa_bench/kernels/stem_cpu.py for the algebra the forward uses (logits folded through
// the C_in = 3 input channels) and the layouts.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

// Layouts (p = query position in the block, j = key position, both 0..15 row-major in the 4x4
// block; every inner loop runs over p, 16 contiguous entries, so it is one plain vector operation):
//   x [B,Ci,H,W]; Wt [O,Ci,16(p)] (O = 3C: q, k, v rows; 2C when v comes from vmap [B,C,H,W]);
//   Rt [16(j),D,16(p)]: the relative table; y [B,C,H,W].
//   Scratch rows are 16-lane vectors over p: x [Ci], proj [3C], P [16(j)] (softmax over j, per lane
//   p).

// Every row is one 16-lane vector over the 16 query positions of a block: simd.h's wvec<T, 16>
// (one AVX-512 register in fp32, two on AVX2, four on the portable path; always in registers).
template <typename T>
using vec16 = sasa::simd::wvec<T, 16>;

template <typename T>
static inline vec16<T> vld(const T* p) {
  return vec16<T>::load(p);
}
// The 4x4 block at plane + (row 0, col 0) of a map with row stride Wd, as one vector (row-major
// positions), and back: four 4-lane row loads joined by shuffles in registers (writing them to a
// buffer and reloading it as one vector would stall store-to-load forwarding on every block).
template <typename T>
static inline vec16<T> load_block(const T* plane, int64_t Wd) {
  using W = vec16<T>;
  using Q = sasa::simd::vec<T, 4>;
  using sasa::simd::ld;
  W o;
  if constexpr (W::NL < 4) {  // rows wider than a register (fp64 on the portable path)
    for (int a = 0; a < 4; ++a)
      for (int h = 0; h < 4 / W::NL; ++h)
        o.r[a * (4 / W::NL) + h] = ld<typename W::R>(plane + a * Wd + h * W::NL);
  } else {
    Q q[4];
    for (int a = 0; a < 4; ++a) q[a] = ld<Q>(plane + a * Wd);
    if constexpr (W::NL == 4) {
      for (int a = 0; a < 4; ++a) o.r[a] = q[a];
    } else {
      auto lo = __builtin_shufflevector(q[0], q[1], 0, 1, 2, 3, 4, 5, 6, 7);
      auto hi = __builtin_shufflevector(q[2], q[3], 0, 1, 2, 3, 4, 5, 6, 7);
      if constexpr (W::NL == 8) {
        o.r[0] = lo;
        o.r[1] = hi;
      } else {
        o.r[0] =
            __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      }
    }
  }
  return o;
}
template <typename T>
static inline void store_block(T* plane, int64_t Wd, const vec16<T>& v) {
  using W = vec16<T>;
  using Q = sasa::simd::vec<T, 4>;
  using sasa::simd::st;
  if constexpr (W::NL < 4) {
    for (int a = 0; a < 4; ++a)
      for (int h = 0; h < 4 / W::NL; ++h) st(plane + a * Wd + h * W::NL, v.r[a * (4 / W::NL) + h]);
  } else {
    Q q[4];
    if constexpr (W::NL == 4) {
      for (int a = 0; a < 4; ++a) q[a] = v.r[a];
    } else {
      sasa::simd::vec<T, 8> lo, hi;
      if constexpr (W::NL == 8) {
        lo = v.r[0];
        hi = v.r[1];
      } else {
        lo = __builtin_shufflevector(v.r[0], v.r[0], 0, 1, 2, 3, 4, 5, 6, 7);
        hi = __builtin_shufflevector(v.r[0], v.r[0], 8, 9, 10, 11, 12, 13, 14, 15);
      }
      q[0] = __builtin_shufflevector(lo, lo, 0, 1, 2, 3);
      q[1] = __builtin_shufflevector(lo, lo, 4, 5, 6, 7);
      q[2] = __builtin_shufflevector(hi, hi, 0, 1, 2, 3);
      q[3] = __builtin_shufflevector(hi, hi, 4, 5, 6, 7);
    }
    for (int a = 0; a < 4; ++a) st(plane + a * Wd, q[a]);
  }
}
// out[o] = sum_c W[o][c] * x[c] for ``rows`` rows of per-position weights W [rows, Ci, 16]
template <typename T>
static inline void project(const T* W, int64_t rows, int64_t Ci, const vec16<T>* x, vec16<T>* out) {
  for (int64_t o = 0; o < rows; ++o) {
    vec16<T> acc = vld(W + o * Ci * 16) * x[0];
    for (int64_t c = 1; c < Ci; ++c) acc += vld(W + (o * Ci + c) * 16) * x[c];
    out[o] = acc;
  }
}
template <typename T>
static inline vec16<T> vsplat(T x) {
  return vec16<T>::splat(x);
}
using sasa::simd::vmax;
template <typename T>
static inline vec16<T> vexp16(const vec16<T>& v) {
  return sasa::simd::vexp(v);
}
// P[j] <- softmax over j of the logit rows P[0..15], lane by lane (per query position p)
template <typename V>
static inline void softmax16(V* P) {
  V mx = P[0];
  for (int j = 1; j < 16; ++j) mx = vmax(mx, P[j]);
  V sum = V::splat(0);
  for (int j = 0; j < 16; ++j) {
    P[j] = vexp16(P[j] - mx);
    sum += P[j];
  }
  const V inv = 1 / sum;
  for (int j = 0; j < 16; ++j) P[j] *= inv;
}

// Forward with the logits folded through the input (C_in = 3 for an RGB stem): per head h,
//   q_p . k_j = x_p^T A_h x_j,        A_h = W_Q,h^T W_K,h               [C_in, C_in]
//   q_p . R[p, j] = x_p . G_h[j, :, p], G_h[j, :, p] = W_Q,h^T R[p, j]   [16, C_in, 16]
// so a logit costs 2 C_in multiply-adds instead of 2 D, and q, k are never formed. Same operator;
// only the rounding differs (the backward, which recomputes P the direct way, agrees to ~1e-6).
//   x [B,Ci,H,W]; Wv [C,Ci,16(p)] per-position value rows (unused with vmap [B,C,H,W]);
//   A [heads,Ci,Ci]; G [heads,16(j),Ci,16(p)]; y [B,C,H,W], or [B,C,H/4,W/4] when pooled.
template <typename T>
static void fwd_impl(const T* x, const T* Wv, const T* A, const T* G, const T* vmap, T* y,
                     int64_t B, int64_t Ci, int64_t H, int64_t Wd, int64_t C, int64_t heads,
                     const T* bn_scale = nullptr, const T* bn_shift = nullptr) {
  // bn_scale != nullptr: inference epilogue. The 4x4 blocks are exactly the 4x4 max-pool's windows,
  // so y [B,C,H/4,W/4] = max over the block of (bn_scale * attn + bn_shift): the full-resolution
  // map is never written (it is 16x the pooled output, and BN + pool would read it twice more).
  using V = vec16<T>;
  const bool pooled = bn_scale != nullptr;
  const int64_t hb = H / 4, wb = Wd / 4, nblk = B * hb * wb, D = C / heads, HW = H * Wd;
  at::parallel_for(0, nblk, 8, [&](int64_t s, int64_t e) {
    std::vector<V> xv(Ci), z(Ci), P(16), v(C);
    std::vector<T> xt(16 * Ci);
    for (int64_t blk = s; blk < e; ++blk) {
      const int64_t b = blk / (hb * wb), r = blk % (hb * wb),
                    base = (r / wb) * 4 * Wd + (r % wb) * 4;
      for (int64_t c = 0; c < Ci; ++c) {
        xv[c] = load_block(x + (b * Ci + c) * HW + base, Wd);
        for (int j = 0; j < 16; ++j) xt[j * Ci + c] = xv[c][j];
      }
      if (vmap != nullptr) {
        for (int64_t o = 0; o < C; ++o) v[o] = load_block(vmap + (b * C + o) * HW + base, Wd);
      } else {
        project(Wv, C, Ci, xv.data(), v.data());
      }
      for (int64_t h = 0; h < heads; ++h) {
        const T* Ah = A + h * Ci * Ci;
        const T* Gh = G + h * 16 * Ci * 16;
        for (int64_t c2 = 0; c2 < Ci; ++c2) {  // z[c2] = sum_c1 A[c1][c2] x[c1]
          V acc = xv[0] * Ah[c2];
          for (int64_t c1 = 1; c1 < Ci; ++c1) acc += xv[c1] * Ah[c1 * Ci + c2];
          z[c2] = acc;
        }
        for (int j = 0; j < 16; ++j) {  // logits of key j for the 16 queries
          V row = z[0] * xt[j * Ci] + xv[0] * vld(Gh + j * Ci * 16);
          for (int64_t c = 1; c < Ci; ++c)
            row += z[c] * xt[j * Ci + c] + xv[c] * vld(Gh + (j * Ci + c) * 16);
          P[j] = row;
        }
        softmax16(P.data());
        for (int64_t dd = 0; dd < D; ++dd) {
          const int64_t ch = h * D + dd;
          const V& vh = v[ch];
          V acc = P[0] * vh[0];
          for (int j = 1; j < 16; ++j) acc += P[j] * vh[j];
          if (pooled) {
            y[(b * C + ch) * hb * wb + r] = sasa::simd::hmax(acc * bn_scale[ch] + bn_shift[ch]);
            continue;
          }
          store_block(y + (b * C + ch) * HW + base, Wd, acc);
        }
      }
    }
  });
}

// out[p][j] = in[j][p] for 16 x 16 (rows are vectors)
template <typename T>
static inline void transpose16(const vec16<T>* in, vec16<T>* out) {
  T src[256], dst[256];
  std::memcpy(src, in, sizeof(src));
  for (int p = 0; p < 16; ++p)
    for (int j = 0; j < 16; ++j) dst[p * 16 + j] = src[j * 16 + p];
  std::memcpy(out, dst, sizeof(dst));
}

// Backward, one block at a time; recomputes the projections and P the direct way (q, k formed),
// because the weight gradients need them. Per head, with rows as vectors over the query p:
//   dP[j] = sum_d g[d] v[d][j];  dS[j] = P[j] (dP[j] - sum_j' P[j'] dP[j'])
//   dq[d] = sum_j dS[j] (k[d][j] + R[j][d]);  dR[j][d] += dS[j] q[d]
// and, as vectors over the key j (through the transposes P^T, dS^T):
//   dv[d] = sum_p g[d][p] P^T[p];  dk[d] = sum_p q[d][p] dS^T[p]
// The weight and relative-table gradients go to per-thread accumulators, reduced at the end.
template <typename T>
static void bwd_impl(const T* x, const T* Wt, const T* Rt, const T* vmap, const T* gy, T* gx, T* gW,
                     T* gRt, T* gv, int64_t B, int64_t Ci, int64_t H, int64_t Wd, int64_t C,
                     int64_t heads) {
  using V = vec16<T>;
  const int64_t hb = H / 4, wb = Wd / 4, nblk = B * hb * wb, D = C / heads, HW = H * Wd;
  const int64_t O = (vmap != nullptr ? 2 : 3) * C;
  const int nt = at::get_num_threads();
  std::vector<std::vector<V>> accW(nt, std::vector<V>(O * Ci, vsplat(T(0))));
  std::vector<std::vector<V>> accR(nt, std::vector<V>(16 * D, vsplat(T(0))));
  at::parallel_for(0, nblk, 8, [&](int64_t s, int64_t e) {
    V* aW = accW[at::get_thread_num()].data();
    V* aR = accR[at::get_thread_num()].data();
    std::vector<V> xv(Ci), proj(3 * C), gp(3 * C), g(C), P(16), PT(16), dS(16), dST(16);
    for (int64_t blk = s; blk < e; ++blk) {
      const int64_t b = blk / (hb * wb), r = blk % (hb * wb),
                    base = (r / wb) * 4 * Wd + (r % wb) * 4;
      for (int64_t c = 0; c < Ci; ++c) xv[c] = load_block(x + (b * Ci + c) * HW + base, Wd);
      project(Wt, O, Ci, xv.data(), proj.data());
      if (vmap != nullptr)
        for (int64_t o = 0; o < C; ++o)
          proj[2 * C + o] = load_block(vmap + (b * C + o) * HW + base, Wd);
      for (int64_t o = 0; o < C; ++o) g[o] = load_block(gy + (b * C + o) * HW + base, Wd);
      for (int64_t h = 0; h < heads; ++h) {
        const V* q = proj.data() + h * D;
        const V* k = proj.data() + C + h * D;
        const V* v = proj.data() + 2 * C + h * D;
        const V* gh = g.data() + h * D;
        for (int j = 0; j < 16; ++j) {
          V row = vsplat(T(0));
          for (int64_t dd = 0; dd < D; ++dd)
            row += q[dd] * (k[dd][j] + vld(Rt + (j * D + dd) * 16));
          P[j] = row;
        }
        softmax16(P.data());
        V dot = vsplat(T(0));
        for (int j = 0; j < 16; ++j) {
          V dP = gh[0] * v[0][j];
          for (int64_t dd = 1; dd < D; ++dd) dP += gh[dd] * v[dd][j];
          dS[j] = dP;
          dot += P[j] * dP;
        }
        for (int j = 0; j < 16; ++j) dS[j] = P[j] * (dS[j] - dot);
        transpose16<T>(P.data(), PT.data());
        transpose16<T>(dS.data(), dST.data());
        for (int64_t dd = 0; dd < D; ++dd) {
          V gq = vsplat(T(0)), gk = vsplat(T(0)), gvv = vsplat(T(0));
          for (int j = 0; j < 16; ++j) {
            gq += dS[j] * (k[dd][j] + vld(Rt + (j * D + dd) * 16));
            aR[j * D + dd] += dS[j] * q[dd];
          }
          for (int p = 0; p < 16; ++p) {
            gk += dST[p] * q[dd][p];
            gvv += PT[p] * gh[dd][p];
          }
          gp[h * D + dd] = gq;
          gp[C + h * D + dd] = gk;
          gp[2 * C + h * D + dd] = gvv;
        }
      }
      if (vmap != nullptr)
        for (int64_t o = 0; o < C; ++o)
          store_block(gv + (b * C + o) * HW + base, Wd, gp[2 * C + o]);
      for (int64_t c = 0; c < Ci; ++c) {
        V acc = vsplat(T(0));
        for (int64_t o = 0; o < O; ++o) {
          aW[o * Ci + c] += gp[o] * xv[c];
          acc += vld(Wt + (o * Ci + c) * 16) * gp[o];
        }
        store_block(gx + (b * Ci + c) * HW + base, Wd, acc);
      }
    }
  });
  for (int t = 0; t < nt; ++t) {
    for (int64_t i = 0; i < O * Ci; ++i)
      for (int p = 0; p < 16; ++p) gW[i * 16 + p] += accW[t][i][p];
    for (int64_t i = 0; i < 16 * D; ++i)
      for (int p = 0; p < 16; ++p) gRt[i * 16 + p] += accR[t][i][p];
  }
}

// x [B,Ci,H,W] with H, W multiples of 4; every tensor contiguous, on the CPU, of x's dtype.
void check_common(const char* fn, const torch::Tensor& x, std::initializer_list<torch::Tensor> ts) {
  TORCH_CHECK(x.dim() == 4, fn, ": x must be [B, C_in, H, W]");
  TORCH_CHECK(x.size(2) % 4 == 0 && x.size(3) % 4 == 0, fn,
              ": H and W must be multiples of 4, got ", x.size(2), "x", x.size(3));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, fn,
              ": float32 or float64 expected, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), fn, ": CPU tensors expected");
  for (const auto& t : ts) {
    TORCH_CHECK(t.numel() == 0 || (t.is_contiguous() && t.device().is_cpu() &&
                                   t.scalar_type() == x.scalar_type()),
                fn, ": every input must be a contiguous CPU tensor of x's dtype");
  }
  TORCH_CHECK(x.is_contiguous(), fn, ": x must be contiguous");
}

}  // namespace

// Wv [C,Ci,16] (empty with vmap), A [heads,Ci,Ci], G [heads,16,Ci,16]; bn_scale/bn_shift [C] or
// empty.
torch::Tensor stem_forward(torch::Tensor x, torch::Tensor Wv, torch::Tensor A, torch::Tensor G,
                           torch::Tensor vmap, int64_t heads, int64_t C, torch::Tensor bn_scale,
                           torch::Tensor bn_shift) {
  check_common("stem_forward", x, {Wv, A, G, vmap, bn_scale, bn_shift});
  const int64_t B = x.size(0), Ci = x.size(1), H = x.size(2), Wd = x.size(3);
  const bool pooled = bn_scale.numel() > 0, hv = vmap.numel() > 0;
  TORCH_CHECK(heads >= 1 && C % heads == 0, "stem_forward: heads must divide C");
  TORCH_CHECK(A.dim() == 3 && A.size(0) == heads && A.size(1) == Ci && A.size(2) == Ci,
              "stem_forward: A must be [heads, C_in, C_in]");
  TORCH_CHECK(
      G.dim() == 4 && G.size(0) == heads && G.size(1) == 16 && G.size(2) == Ci && G.size(3) == 16,
      "stem_forward: G must be [heads, 16, C_in, 16]");
  TORCH_CHECK(hv ? (vmap.dim() == 4 && vmap.size(0) == B && vmap.size(1) == C &&
                    vmap.size(2) == H && vmap.size(3) == Wd)
                 : (Wv.dim() == 3 && Wv.size(0) == C && Wv.size(1) == Ci && Wv.size(2) == 16),
              "stem_forward: values need Wv [C, C_in, 16] or a value map [B, C, H, W]");
  TORCH_CHECK(!pooled || (bn_scale.numel() == C && bn_shift.numel() == C),
              "stem_forward: bn_scale and bn_shift must have C entries");
  auto y = pooled ? torch::empty({B, C, H / 4, Wd / 4}, x.options())
                  : torch::empty({B, C, H, Wd}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stem_forward", [&] {
    fwd_impl<scalar_t>(x.data_ptr<scalar_t>(), hv ? nullptr : Wv.data_ptr<scalar_t>(),
                       A.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(),
                       hv ? vmap.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), B, Ci, H,
                       Wd, C, heads, pooled ? bn_scale.data_ptr<scalar_t>() : nullptr,
                       pooled ? bn_shift.data_ptr<scalar_t>() : nullptr);
  });
  return y;
}

std::vector<torch::Tensor> stem_backward(torch::Tensor x, torch::Tensor W, torch::Tensor Rt,
                                         torch::Tensor vmap, torch::Tensor gy, int64_t heads) {
  check_common("stem_backward", x, {W, Rt, vmap, gy});
  TORCH_CHECK(heads >= 1 && Rt.dim() == 3 && Rt.size(0) == 16 && Rt.size(2) == 16,
              "stem_backward: Rt must be [16, D, 16]");
  const int64_t B = x.size(0), Ci = x.size(1), H = x.size(2), Wd = x.size(3),
                C = Rt.size(1) * heads;
  const bool hv = vmap.numel() > 0;
  TORCH_CHECK(W.dim() == 3 && W.size(0) == (hv ? 2 : 3) * C && W.size(1) == Ci && W.size(2) == 16,
              "stem_backward: W must be [O, C_in, 16] with O = 3C (2C with a value map)");
  TORCH_CHECK(
      gy.dim() == 4 && gy.size(0) == B && gy.size(1) == C && gy.size(2) == H && gy.size(3) == Wd,
      "stem_backward: gy must be [B, C, H, W]");
  TORCH_CHECK(!hv || vmap.sizes() == gy.sizes(),
              "stem_backward: the value map must be [B, C, H, W]");
  auto gx = torch::empty_like(x);
  auto gW = torch::zeros_like(W);
  auto gRt = torch::zeros_like(Rt);
  auto gv = hv ? torch::empty_like(vmap) : torch::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stem_backward", [&] {
    bwd_impl<scalar_t>(x.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), Rt.data_ptr<scalar_t>(),
                       hv ? vmap.data_ptr<scalar_t>() : nullptr, gy.data_ptr<scalar_t>(),
                       gx.data_ptr<scalar_t>(), gW.data_ptr<scalar_t>(), gRt.data_ptr<scalar_t>(),
                       hv ? gv.data_ptr<scalar_t>() : nullptr, B, Ci, H, Wd, C, heads);
  });
  return {gx, gW, gRt, gv};
}
