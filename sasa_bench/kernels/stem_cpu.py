"""A fused C++ kernel for the attention stem's block attention (CPU), with a hand-written backward.

One pass per 4x4 block of the image, everything in thread-local scratch (no full-resolution
intermediate but the output): gather the block's pixels x [C_in, 16], project them to the
spatially aware values with per-position weights (unless the values come from a precomputed
map), then per head logits ``q_p . (k_j + R[p, j])``, a 16-way softmax and the weighted sum of
values, written straight into ``y [B, C, H, W]`` -- or, at inference, through the eval-mode BN
affine and the 4x4 max-pool into ``[B, C, H/4, W/4]`` (the blocks are the pool's windows).
The forward never forms q or k: with C_in = 3 input channels, ``q_p . k_j = x_p^T (W_Q^T W_K) x_j``
and ``q_p . R[p, j] = x_p . (W_Q^T R[p, j])``, so a logit costs 2 C_in multiply-adds instead of
2 D (the algebra is exact; the rounding differs from the direct form by ~1e-7 relative). Every inner loop runs along
the 16 query positions of the block (one AVX-512 vector of fp32), the softmax included (a
vectorisable Cephes-style ``expf``, ~1 ulp; fp64 uses ``std::exp``).
Backward recomputes the block (cheap: 16x16 per head) and writes ``dx`` (and ``dv`` for a value
map); the weight and relative-table gradients are reduced over per-thread accumulators.

Built on first use with :func:`torch.utils.cpp_extension.load_inline` and cached in torch's
extension directory under a name keyed by the source, this CPU's flags and the torch version
(keyed like :mod:`sasa_bench.kernels.cpu_fused`, through :mod:`sasa_bench.kernels.cpp_build`). If no
compiler is found or the build fails, one one-line warning is printed and ``is_available()``
returns False from then on; callers then use their pure-PyTorch path.
"""

from __future__ import annotations

from types import ModuleType

import torch

from sasa_bench.kernels.cpp_build import InlineExtension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Layouts (p = query position in the block, j = key position, both 0..15 row-major in the 4x4 block;
// every inner loop runs over p, 16 contiguous entries, so it is one plain vector operation):
//   x [B,Ci,H,W]; Wt [O,Ci,16(p)] (O = 3C: q, k, v rows; 2C when v comes from vmap [B,C,H,W]);
//   Rt [16(j),D,16(p)]: the relative table; y [B,C,H,W].
//   Scratch rows are 16-lane vectors over p: x [Ci], proj [3C], P [16(j)] (softmax over j, per lane p).

// 16-lane vectors (GCC vector extensions): every row is one vector over the 16 query positions,
// one AVX-512 register in fp32; written out so the compiler cannot fall back to narrow shuffles.
template <typename T>
struct Lanes16 {
  typedef T type __attribute__((vector_size(16 * sizeof(T))));
};
template <typename T>
using vec16 = typename Lanes16<T>::type;

template <typename T>
static inline vec16<T> vld(const T* p) {
  vec16<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// The 4x4 block at plane + (row 0, col 0) of a map with row stride Wd, as one vector (row-major
// positions), and back.
template <typename T>
static inline vec16<T> load_block(const T* plane, int64_t Wd) {
  vec16<T> v;
  for (int a = 0; a < 4; ++a)
    for (int e = 0; e < 4; ++e) v[a * 4 + e] = plane[a * Wd + e];
  return v;
}
template <typename T>
static inline void store_block(T* plane, int64_t Wd, vec16<T> v) {
  for (int a = 0; a < 4; ++a) std::memcpy(plane + a * Wd, reinterpret_cast<T*>(&v) + a * 4, 4 * sizeof(T));
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
  vec16<T> v;
  for (int l = 0; l < 16; ++l) v[l] = x;
  return v;
}
template <typename V>
static inline V vmax(V a, V b) {
  return a > b ? a : b;
}
static inline vec16<float> vexp16(vec16<float> v) {  // Cephes expf (~1 ulp), lane-parallel; args <= 0 here
  typedef int32_t VI __attribute__((vector_size(64)));
  v = vmax(v, vsplat(-87.0f));
  const vec16<float> n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vec16<float> r = v - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec16<float> p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vec16<float> e = p * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  vec16<float> sc;
  std::memcpy(&sc, &bits, sizeof(sc));
  return e * sc;
}
static inline vec16<double> vexp16(vec16<double> v) {
  for (int l = 0; l < 16; ++l) v[l] = std::exp(v[l]);
  return v;
}
// P[j] <- softmax over j of the logit rows P[0..15], lane by lane (per query position p)
template <typename V>
static inline void softmax16(V* P) {
  V mx = P[0];
  for (int j = 1; j < 16; ++j) mx = vmax(mx, P[j]);
  V sum = P[0] - P[0];
  for (int j = 0; j < 16; ++j) {
    P[j] = vexp16(P[j] - mx);
    sum += P[j];
  }
  const V inv = 1 / sum;
  for (int j = 0; j < 16; ++j) P[j] *= inv;
}
template <typename V>
static inline auto hmax16(V v) {  // horizontal max, a shuffle tree
  v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

// Forward with the logits folded through the input (C_in = 3 for an RGB stem): per head h,
//   q_p . k_j = x_p^T A_h x_j,        A_h = W_Q,h^T W_K,h               [C_in, C_in]
//   q_p . R[p, j] = x_p . G_h[j, :, p], G_h[j, :, p] = W_Q,h^T R[p, j]   [16, C_in, 16]
// so a logit costs 2 C_in multiply-adds instead of 2 D, and q, k are never formed. Same operator;
// only the rounding differs (the backward, which recomputes P the direct way, agrees to ~1e-6).
//   x [B,Ci,H,W]; Wv [C,Ci,16(p)] per-position value rows (unused with vmap [B,C,H,W]);
//   A [heads,Ci,Ci]; G [heads,16(j),Ci,16(p)]; y [B,C,H,W], or [B,C,H/4,W/4] when pooled.
template <typename T>
static void fwd_impl(const T* x, const T* Wv, const T* A, const T* G, const T* vmap, T* y, int64_t B,
                     int64_t Ci, int64_t H, int64_t Wd, int64_t C, int64_t heads, const T* bn_scale = nullptr,
                     const T* bn_shift = nullptr) {
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
      const int64_t b = blk / (hb * wb), r = blk % (hb * wb), base = (r / wb) * 4 * Wd + (r % wb) * 4;
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
          for (int64_t c = 1; c < Ci; ++c) row += z[c] * xt[j * Ci + c] + xv[c] * vld(Gh + (j * Ci + c) * 16);
          P[j] = row;
        }
        softmax16(P.data());
        for (int64_t dd = 0; dd < D; ++dd) {
          const int64_t ch = h * D + dd;
          const V& vh = v[ch];
          V acc = P[0] * vh[0];
          for (int j = 1; j < 16; ++j) acc += P[j] * vh[j];
          if (pooled) {
            y[(b * C + ch) * hb * wb + r] = hmax16(acc * bn_scale[ch] + bn_shift[ch]);
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
static void bwd_impl(const T* x, const T* Wt, const T* Rt, const T* vmap, const T* gy, T* gx, T* gW, T* gRt,
                     T* gv, int64_t B, int64_t Ci, int64_t H, int64_t Wd, int64_t C, int64_t heads) {
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
      const int64_t b = blk / (hb * wb), r = blk % (hb * wb), base = (r / wb) * 4 * Wd + (r % wb) * 4;
      for (int64_t c = 0; c < Ci; ++c) xv[c] = load_block(x + (b * Ci + c) * HW + base, Wd);
      project(Wt, O, Ci, xv.data(), proj.data());
      if (vmap != nullptr)
        for (int64_t o = 0; o < C; ++o) proj[2 * C + o] = load_block(vmap + (b * C + o) * HW + base, Wd);
      for (int64_t o = 0; o < C; ++o) g[o] = load_block(gy + (b * C + o) * HW + base, Wd);
      for (int64_t h = 0; h < heads; ++h) {
        const V* q = proj.data() + h * D;
        const V* k = proj.data() + C + h * D;
        const V* v = proj.data() + 2 * C + h * D;
        const V* gh = g.data() + h * D;
        for (int j = 0; j < 16; ++j) {
          V row = vsplat(T(0));
          for (int64_t dd = 0; dd < D; ++dd) row += q[dd] * (k[dd][j] + vld(Rt + (j * D + dd) * 16));
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
        for (int64_t o = 0; o < C; ++o) store_block(gv + (b * C + o) * HW + base, Wd, gp[2 * C + o]);
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

// Wv [C,Ci,16] (empty with vmap), A [heads,Ci,Ci], G [heads,16,Ci,16]; bn_scale/bn_shift [C] or empty.
torch::Tensor stem_forward(torch::Tensor x, torch::Tensor Wv, torch::Tensor A, torch::Tensor G, torch::Tensor vmap,
                           int64_t heads, int64_t C, torch::Tensor bn_scale, torch::Tensor bn_shift) {
  const int64_t B = x.size(0), Ci = x.size(1), H = x.size(2), Wd = x.size(3);
  const bool pooled = bn_scale.numel() > 0, hv = vmap.numel() > 0;
  auto y = pooled ? torch::empty({B, C, H / 4, Wd / 4}, x.options()) : torch::empty({B, C, H, Wd}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stem_forward", [&] {
    fwd_impl<scalar_t>(x.data_ptr<scalar_t>(), hv ? nullptr : Wv.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                       G.data_ptr<scalar_t>(), hv ? vmap.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                       B, Ci, H, Wd, C, heads, pooled ? bn_scale.data_ptr<scalar_t>() : nullptr,
                       pooled ? bn_shift.data_ptr<scalar_t>() : nullptr);
  });
  return y;
}

std::vector<torch::Tensor> stem_backward(torch::Tensor x, torch::Tensor W, torch::Tensor Rt, torch::Tensor vmap,
                                         torch::Tensor gy, int64_t heads) {
  const int64_t B = x.size(0), Ci = x.size(1), H = x.size(2), Wd = x.size(3), C = Rt.size(1) * heads;
  const bool hv = vmap.numel() > 0;
  auto gx = torch::empty_like(x);
  auto gW = torch::zeros_like(W);
  auto gRt = torch::zeros_like(Rt);
  auto gv = hv ? torch::empty_like(vmap) : torch::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stem_backward", [&] {
    bwd_impl<scalar_t>(x.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), Rt.data_ptr<scalar_t>(),
                       hv ? vmap.data_ptr<scalar_t>() : nullptr, gy.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                       gW.data_ptr<scalar_t>(), gRt.data_ptr<scalar_t>(), hv ? gv.data_ptr<scalar_t>() : nullptr,
                       B, Ci, H, Wd, C, heads);
  });
  return {gx, gW, gRt, gv};
}
"""

_DECLS = r"""
#include <torch/extension.h>
#include <vector>
torch::Tensor stem_forward(torch::Tensor x, torch::Tensor Wv, torch::Tensor A, torch::Tensor G, torch::Tensor vmap,
                           int64_t heads, int64_t C, torch::Tensor bn_scale, torch::Tensor bn_shift);
std::vector<torch::Tensor> stem_backward(torch::Tensor x, torch::Tensor W, torch::Tensor Rt, torch::Tensor vmap,
                                         torch::Tensor gy, int64_t heads);
"""

EXTENSION = InlineExtension(
    "sasa_stem_cpu", _DECLS, _SOURCE, ["stem_forward", "stem_backward"],
    fallback="the PyTorch attention-stem path",
)


def _load() -> ModuleType | None:
    return EXTENSION.load()


def is_available() -> bool:
    """True if the kernel is built or (cheap probe, no build) a compiler is on PATH and no build failed."""
    return EXTENSION.is_available()


def load() -> bool:
    """Build or load the kernel now (warns once on failure); True if it is usable."""
    return _load() is not None


def _folded(wc: torch.Tensor, rc: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel's operands from the kernel-layout weights wc [O, C_in, 16] and relative
    table rc [16 (key), D, 16 (query)]: the value rows Wv [C, C_in, 16] (empty when O = 2C),
    A [heads, C_in, C_in] = W_Q,h^T W_K,h and G [heads, 16 (key), C_in, 16 (query)] = W_Q,h^T R."""
    d = rc.shape[1]
    c = d * heads
    wq = wc[:c, :, 0]
    qk = wc[:2 * c]
    if not torch.allclose(qk, qk[:, :, :1].expand_as(qk), rtol=0, atol=0, equal_nan=True):
        raise ValueError("the stem kernel needs position-independent query and key weights")
    wq_h, wk_h = wq.view(heads, d, -1), wc[c:2 * c, :, 0].view(heads, d, -1)
    with torch.autocast(wc.device.type, enabled=False):  # in the kernel's dtype, also under autocast
        a = torch.einsum("hdc,hde->hce", wq_h, wk_h).contiguous()
        g = torch.einsum("hdc,jdp->hjcp", wq_h, rc).contiguous()
    wv = wc[2 * c:].contiguous() if wc.shape[0] == 3 * c else wc.new_empty(0)
    return wv, a, g


def _kernel_inputs(x: torch.Tensor, weight_t: torch.Tensor, rel_t: torch.Tensor, vmap: torch.Tensor | None):
    """Contiguous copies in the kernel's dtype (fp32, or fp64 for fp64 inputs); an empty ``vmap``."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc = x.to(dtype).contiguous()
    vc = vmap.to(dtype).contiguous() if vmap is not None else xc.new_empty(0)
    return xc, weight_t.to(dtype).contiguous(), rel_t.to(dtype).contiguous(), vc


def _forward(
    xc: torch.Tensor, wc: torch.Tensor, rc: torch.Tensor, vc: torch.Tensor, heads: int,
    bn_scale: torch.Tensor | None = None, bn_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward kernel on :func:`_kernel_inputs`; pooled through BN when ``bn_scale`` is given."""
    sc = sh = xc.new_empty(0)
    if bn_scale is not None and bn_shift is not None:
        sc, sh = bn_scale.to(xc.dtype).contiguous(), bn_shift.to(xc.dtype).contiguous()
    return _load().stem_forward(xc, *_folded(wc, rc, heads), vc, heads, rc.shape[1] * heads, sc, sh)


def _require() -> None:
    if _load() is None:
        raise RuntimeError(f"the fused attention-stem kernel is unavailable: {EXTENSION.failed}")


class _StemBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, rel_t, vmap, heads):  # noqa: ANN001, ANN205
        xc, wc, rc, vc = _kernel_inputs(x, weight, rel_t, vmap)
        ctx.save_for_backward(xc, wc, rc, vc)
        ctx.heads = heads
        ctx.dtypes = (x.dtype, weight.dtype, rel_t.dtype, vmap.dtype if vmap is not None else None)
        return _forward(xc, wc, rc, vc, heads)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        xc, wc, rc, vc = ctx.saved_tensors
        x_dt, w_dt, r_dt, v_dt = ctx.dtypes
        gx, gw, gr, gv = _load().stem_backward(xc, wc, rc, vc, gy.to(xc.dtype).contiguous(), ctx.heads)
        return gx.to(x_dt), gw.to(w_dt), gr.to(r_dt), (gv.to(v_dt) if v_dt is not None else None), None


def stem_block_attention(
    x: torch.Tensor, weight: torch.Tensor, rel: torch.Tensor, vmap: torch.Tensor | None, heads: int
) -> torch.Tensor:
    """Block attention of the stem in one fused pass.

    x [B, C_in, H, W] (H, W multiples of 4); weight [16, O, C_in]: per block position the stacked
    query, key and (when ``vmap`` is None) value projections, O = 3C (2C with ``vmap``); the query
    and key rows must not depend on the position (the forward folds them, see the C++ source);
    rel [16 (query), 16 (key), D]: the relative logit table, shared by the heads;
    vmap [B, C, H, W] or None: precomputed values. Returns [B, C, H, W] in fp32 (fp64 for fp64
    inputs; bf16/fp16 inputs are computed in fp32). Raises RuntimeError if the kernel is unavailable.
    """
    _require()
    # the kernel's layouts put the query position last (one vector per row): [O, C_in, 16], [16, D, 16]
    return _StemBlockAttention.apply(x, weight.permute(1, 2, 0), rel.permute(1, 2, 0), vmap, heads)


def stem_block_attention_pooled(
    x: torch.Tensor,
    weight: torch.Tensor,
    rel: torch.Tensor,
    vmap: torch.Tensor | None,
    heads: int,
    bn_scale: torch.Tensor,
    bn_shift: torch.Tensor,
) -> torch.Tensor:
    """Inference only (no autograd): ``maxpool4x4(bn_scale * attn + bn_shift)`` in one pass.

    Same arguments as :func:`stem_block_attention` plus the eval-mode BatchNorm folded to a
    per-channel affine [C]; returns [B, C, H/4, W/4]. The full-resolution map is never written.
    """
    _require()
    inputs = _kernel_inputs(x, weight.permute(1, 2, 0), rel.permute(1, 2, 0), vmap)
    y = _forward(*inputs, heads, bn_scale, bn_shift)
    return y if x.dtype == y.dtype else y.to(x.dtype)
