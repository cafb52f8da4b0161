// Fused local self-attention on the CPU: forward and a recomputing backward.
//
// Layout: q, k, v [B,N,D,H,W] (the projections' NCHW output viewed per head), copied once into
// zero-padded rows of Wpp = roundup(W, LT) + 2r entries (pixel column j at index j + r), so that
// every inner loop is a plain vector operation along a row (kLanes pixels per vector, see
// simd.h) with no bounds checks; the padding is a 1x copy, never the K*K-fold window copy.
//
//   forward, one task per (b, n, pixel row i), per chunk of L pixels:
//     L[t,u] = q . k_{i+t-r, j+u-r} + q.r   (-inf where masked; zero keys where not)
//     y      = sum_{t,u} softmax(L)[t,u] v_{i+t-r, j+u-r};   saved: logsumexp per pixel
//   backward, one task per (b, n), pixel rows in order:
//     recompute P = exp(L - lse); dP = g . v; dS = P (dP - sum P dP); dq = sum dS (k + r);
//     P and dS of the last K rows stay in a ring buffer, and each key row's dk, dv are
//     gathered from it once complete (no atomics, no overlapping read-modify-writes).
//
// Nothing K*K-sized is ever stored in memory: the forward returns the output and one
// log-sum-exp per pixel; the per-row logits live in a thread-local scratch row.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

using sasa::simd::ld;
using sasa::simd::ld_n;
using sasa::simd::st;
using sasa::simd::st_n;
using sasa::simd::vec;
using sasa::simd::vexp;

constexpr int kRelStride = 16;  // lanes of the embeddings' partial sums (>= every chunk width)

struct Dims {
  int64_t BN, D, Dv, H, W, K, r, Wv, Wpp, KK, Dr;
};

constexpr int UB = 8;  // window columns u held in registers at once
constexpr int CB = 4;  // channels held in registers at once

// Padded layout: every row of qp/kp/vp/gp/P/dS has Wpp = Wv + 2r entries, pixel column j at
// index j + r, zeros elsewhere; Wv = W rounded up to the vector length L.

// Logits of one chunk of L pixels of row i into Ps[t*K+u][r + c0 + lane] (-inf where masked).
// qs: scratch for 2*K vectors (the q.r terms of this chunk).
template <typename T, int L>
static inline void logits_chunk(const T* __restrict qb, const T* __restrict kb,
                                const T* __restrict rr, const T* __restrict rc, T* __restrict qs,
                                T* __restrict Ps, const Dims& s, int64_t i, int64_t c0, bool has_k,
                                bool has_rel, bool mask) {
  using V = vec<T, L>;
  const int64_t D = s.D, H = s.H, W = s.W, K = s.K, r = s.r, Wpp = s.Wpp, Dr = s.Dr;
  const int64_t HWp = H * Wpp;
  const T ninf = -std::numeric_limits<T>::infinity();
  V jf;
  for (int l = 0; l < L; ++l) jf[l] = T(c0 + l);
  const int64_t t0 = std::max<int64_t>(0, r - i), t1 = std::min<int64_t>(K, H + r - i);
  T* qrr = qs;
  T* qrc = qs + K * L;
  if (has_rel) {
    for (int64_t t = 0; t < K; ++t) {
      V a = V{}, c = V{};
      for (int64_t d = 0; d < Dr; ++d) a += rr[t * Dr + d] * ld<V>(qb + d * HWp + c0);
      for (int64_t d = Dr; d < D; ++d) c += rc[t * (D - Dr) + (d - Dr)] * ld<V>(qb + d * HWp + c0);
      st(qrr + t * L, a);
      st(qrc + t * L, c);
    }
  }
  for (int64_t t = 0; t < K; ++t) {
    const bool row_ok = t >= t0 && t < t1;
    T* Pt = Ps + t * K * Wpp + r + c0;
    if (!row_ok && mask) {
      for (int64_t u = 0; u < K; ++u) st(Pt + u * Wpp, V{} + ninf);
      continue;
    }
    const V qr_t = has_rel ? ld<V>(qrr + t * L) : V{};
    for (int64_t u0 = 0; u0 < K; u0 += UB) {
      const int nb = (int)std::min<int64_t>(UB, K - u0);
      V acc[UB];
      for (int uu = 0; uu < UB; ++uu)
        acc[uu] = has_rel && uu < nb ? qr_t + ld<V>(qrc + (u0 + uu) * L) : V{};
      if (row_ok && has_k) {
        const T* kr = kb + (i + t - r) * Wpp + c0 + u0;
        for (int64_t d = 0; d < D; ++d) {
          const V qv = ld<V>(qb + d * HWp + c0);
          const T* kd = kr + d * HWp;
          for (int uu = 0; uu < UB; ++uu)
            if (uu < nb) acc[uu] += qv * ld<V>(kd + uu);
        }
      }
      for (int uu = 0; uu < nb; ++uu) {
        V x = acc[uu];
        if (mask) {
          const V col = jf + T(u0 + uu - r);
          x = (col < T(0)) | (col >= T(W)) ? V{} + ninf : x;
        }
        st(Pt + (u0 + uu) * Wpp, x);
      }
    }
  }
}

template <typename T, int L>
static inline void forward_chunk(const T* __restrict qb, const T* __restrict kb,
                                 const T* __restrict vb, const T* __restrict rr,
                                 const T* __restrict rc, T* __restrict out, T* __restrict lse,
                                 T* __restrict qs, T* __restrict Ps, const Dims& s, int64_t bn,
                                 int64_t i, int64_t c0, bool has_k, bool has_rel, bool mask) {
  using V = vec<T, L>;
  const int64_t Dv = s.Dv, H = s.H, W = s.W, K = s.K, r = s.r, Wpp = s.Wpp, KK = s.KK;
  const int64_t HW = H * W, HWp = H * Wpp;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t t0 = std::max<int64_t>(0, r - i), t1 = std::min<int64_t>(K, H + r - i);
  logits_chunk<T, L>(qb, kb, rr, rc, qs, Ps, s, i, c0, has_k, has_rel, mask);
  V m = V{} + ninf;
  for (int64_t tu = 0; tu < KK; ++tu) {
    const V x = ld<V>(Ps + tu * Wpp + r + c0);
    m = x > m ? x : m;
  }
  V sum = V{};
  for (int64_t tu = 0; tu < KK; ++tu) {
    T* p = Ps + tu * Wpp + r + c0;
    const V e = vexp<T, L>(ld<V>(p) - m);
    sum += e;
    st(p, e);
  }
  const V inv = T(1) / sum;
  V ls;
  for (int l = 0; l < L; ++l) ls[l] = m[l] + std::log(sum[l]);
  st_n(lse + (bn * H + i) * W + c0, ls, W - c0);
  for (int64_t e0 = 0; e0 < Dv; e0 += CB) {
    const int ne = (int)std::min<int64_t>(CB, Dv - e0);
    V acc[CB];
    for (int ee = 0; ee < CB; ++ee) acc[ee] = V{};
    for (int64_t t = t0; t < t1; ++t) {
      const T* vr = vb + e0 * HWp + (i + t - r) * Wpp + c0;
      const T* Pt = Ps + t * K * Wpp + r + c0;
      for (int64_t u = 0; u < K; ++u) {
        const V p = ld<V>(Pt + u * Wpp);
        for (int ee = 0; ee < CB; ++ee)
          if (ee < ne) acc[ee] += p * ld<V>(vr + ee * HWp + u);
      }
    }
    for (int ee = 0; ee < ne; ++ee)
      st_n(out + bn * Dv * HW + (e0 + ee) * HW + i * W + c0, acc[ee] * inv, W - c0);
  }
}

// Chunks along a row: LB lanes while they fit in Wv (= W rounded up to LT), then LT lanes.
// When LB == LT (AVX2, portable) the second loop never runs and only one chunk width is compiled.
template <int LB, int LT, typename FB, typename FT>
static inline void for_chunks(int64_t Wv, FB&& fb, FT&& ft) {
  int64_t c0 = 0;
  for (; c0 + LB <= Wv; c0 += LB) fb(c0);
  if constexpr (LT != LB)
    for (; c0 < Wv; c0 += LT) ft(c0);
}

// Where the zero-padded [C, H, Wpp] block of one (b, n) comes from: a padded copy of the whole
// tensor (``padded``), or the unpadded input itself, padded into a thread-local buffer when a
// task starts. The second fuses the padding into the kernel's own parallel loop: no extra pass
// over memory, no extra parallel region (each costs a scheduling delay on a busy host), and the
// block stays in cache.
template <typename T>
struct BlockSource {
  const T* base = nullptr;             // nullptr: absent (no keys)
  int64_t C = 0, N = 1, stride_b = 0;  // unpadded: (b,n,c,h,w) at b*stride_b + ((n*C+c)*H+h)*W+w
  bool padded = true;

  const T* block(int64_t bn, const Dims& s, std::vector<T>& buf) const {
    if (base == nullptr) return nullptr;
    if (padded) return base + bn * C * s.H * s.Wpp;
    if (buf.empty()) buf.assign(C * s.H * s.Wpp + 16, T(0));  // pads are zero and stay zero
    const T* src = base + (bn / N) * stride_b + (bn % N) * C * s.H * s.W;
    for (int64_t row = 0; row < C * s.H; ++row)
      std::memcpy(buf.data() + row * s.Wpp + s.r, src + row * s.W, sizeof(T) * s.W);
    return buf.data();
  }
};

template <typename T, int LB, int LT>
void forward_impl(const BlockSource<T>& qsrc, const BlockSource<T>& ksrc,
                  const BlockSource<T>& vsrc, const T* __restrict rr, const T* __restrict rc,
                  T* __restrict out, T* __restrict lse, Dims s, bool has_k, bool has_rel,
                  bool mask) {
  const int64_t H = s.H, K = s.K, r = s.r, Wpp = s.Wpp, KK = s.KK;
  auto row = [&](int64_t bn, int64_t i, const T* qbn, const T* kb, const T* vb, T* qs, T* Ps) {
    const T* qb = qbn + i * Wpp + r;
    for_chunks<LB, LT>(
        s.Wv,
        [&](int64_t c0) {
          forward_chunk<T, LB>(qb, kb, vb, rr, rc, out, lse, qs, Ps, s, bn, i, c0, has_k, has_rel,
                               mask);
        },
        [&](int64_t c0) {
          forward_chunk<T, LT>(qb, kb, vb, rr, rc, out, lse, qs, Ps, s, bn, i, c0, has_k, has_rel,
                               mask);
        });
  };
  if (qsrc.padded) {  // one task per pixel row: enough tasks when B*N is small
    at::parallel_for(0, s.BN * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> qs(2 * K * LB), scratch(KK * Wpp + LB), none;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bn = task / H;
        row(bn, task % H, qsrc.block(bn, s, none), ksrc.block(bn, s, none), vsrc.block(bn, s, none),
            qs.data(), scratch.data());
      }
    });
    return;
  }
  at::parallel_for(0, s.BN, 1, [&](int64_t begin, int64_t end) {  // one task per (b, n)
    std::vector<T> qs(2 * K * LB), scratch(KK * Wpp + LB), qbuf, kbuf, vbuf;
    for (int64_t bn = begin; bn < end; ++bn) {
      const T* qbn = qsrc.block(bn, s, qbuf);
      const T* kb = ksrc.block(bn, s, kbuf);
      const T* vb = vsrc.block(bn, s, vbuf);
      for (int64_t i = 0; i < H; ++i) row(bn, i, qbn, kb, vb, qs.data(), scratch.data());
    }
  });
}

// Backward for one chunk of pixel row i: P (from lse), dP, dS (into the ring rows Ps / Ss),
// row/column sums of dS, and dq.
template <typename T, int L>
static inline void backward_chunk(const T* __restrict qb, const T* __restrict gb,
                                  const T* __restrict kb, const T* __restrict vb,
                                  const T* __restrict rr, const T* __restrict rc,
                                  const T* __restrict lse, T* __restrict dq, T* __restrict relacc,
                                  T* __restrict qs, T* __restrict Ps, T* __restrict Ss,
                                  const Dims& s, int64_t bn, int64_t i, int64_t c0, bool has_k,
                                  bool has_rel, bool mask) {
  using V = vec<T, L>;
  const int64_t D = s.D, Dv = s.Dv, H = s.H, W = s.W, K = s.K, r = s.r, Wpp = s.Wpp, KK = s.KK,
                Dr = s.Dr;
  const int64_t HW = H * W, HWp = H * Wpp;
  const int64_t task = bn * H + i;
  const int64_t t0 = std::max<int64_t>(0, r - i), t1 = std::min<int64_t>(K, H + r - i);
  V jf;
  for (int l = 0; l < L; ++l) jf[l] = T(c0 + l);
  const auto inside = jf < T(W);
  logits_chunk<T, L>(qb, kb, rr, rc, qs, Ps, s, i, c0, has_k, has_rel, mask);
  const V ls = ld_n<T, V>(lse + task * W + c0, W - c0);
  for (int64_t tu = 0; tu < KK; ++tu) {
    T* p = Ps + tu * Wpp + r + c0;
    const V e = vexp<T, L>(ld<V>(p) - ls);
    st(p, inside ? e : V{});
  }
  // dP = g . v (zero for window rows outside the image)
  for (int64_t t = 0; t < K; ++t) {
    T* St = Ss + t * K * Wpp + r + c0;
    if (!(t >= t0 && t < t1)) {
      for (int64_t u = 0; u < K; ++u) st(St + u * Wpp, V{});
      continue;
    }
    const T* vr = vb + (i + t - r) * Wpp + c0;
    for (int64_t u0 = 0; u0 < K; u0 += UB) {
      const int nb = (int)std::min<int64_t>(UB, K - u0);
      V acc[UB];
      for (int uu = 0; uu < UB; ++uu) acc[uu] = V{};
      for (int64_t e = 0; e < Dv; ++e) {
        const V gv = ld<V>(gb + e * HWp + c0);
        const T* ve = vr + e * HWp + u0;
        for (int uu = 0; uu < UB; ++uu)
          if (uu < nb) acc[uu] += gv * ld<V>(ve + uu);
      }
      for (int uu = 0; uu < nb; ++uu) st(St + (u0 + uu) * Wpp, acc[uu]);
    }
  }
  V sp = V{};
  for (int64_t tu = 0; tu < KK; ++tu)
    sp += ld<V>(Ps + tu * Wpp + r + c0) * ld<V>(Ss + tu * Wpp + r + c0);
  T* rsv = qs;  // the q.r scratch is free again: row sums, then column sums
  T* csv = qs + K * L;
  for (int64_t t = 0; t < K; ++t) {
    V rsum = V{};
    for (int64_t u = 0; u < K; ++u) {
      const int64_t o = (t * K + u) * Wpp + r + c0;
      const V x = ld<V>(Ps + o) * (ld<V>(Ss + o) - sp);
      st(Ss + o, x);
      rsum += x;
      st(csv + u * L, (t == 0 ? V{} : ld<V>(csv + u * L)) + x);
    }
    st(rsv + t * L, rsum);
  }
  if (has_rel) {
    // embeddings' gradients: relacc[t][d] += rowsum_t * q_d (d < Dr), colsum_u * q_d (d >= Dr),
    // kept as kRelStride-lane partial sums (reduced once per (b, n))
    for (int64_t d = 0; d < D; ++d) {
      const V qv = ld<V>(qb + d * HWp + c0);
      const T* sums = d < Dr ? rsv : csv;
      for (int64_t t = 0; t < K; ++t) {
        T* a = relacc + (t * D + d) * kRelStride;
        st(a, ld<V>(a) + ld<V>(sums + t * L) * qv);
      }
    }
  }
  // dq = sum dS k (+ rel)
  for (int64_t d0 = 0; d0 < D; d0 += CB) {
    const int nd = (int)std::min<int64_t>(CB, D - d0);
    V acc[CB];
    for (int dd = 0; dd < CB; ++dd) acc[dd] = V{};
    if (has_k) {
      for (int64_t t = t0; t < t1; ++t) {
        const T* kr = kb + (d0 * H + i + t - r) * Wpp + c0;
        const T* St = Ss + t * K * Wpp + r + c0;
        for (int64_t u = 0; u < K; ++u) {
          const V p = ld<V>(St + u * Wpp);
          for (int dd = 0; dd < CB; ++dd)
            if (dd < nd) acc[dd] += p * ld<V>(kr + dd * HWp + u);
        }
      }
    }
    for (int dd = 0; dd < nd; ++dd) {
      const int64_t d = d0 + dd;
      V a = acc[dd];
      if (has_rel) {
        if (d < Dr)
          for (int64_t t = 0; t < K; ++t) a += rr[t * Dr + d] * ld<V>(rsv + t * L);
        else
          for (int64_t u = 0; u < K; ++u) a += rc[u * (D - Dr) + (d - Dr)] * ld<V>(csv + u * L);
      }
      st_n(dq + bn * D * HW + d * HW + i * W + c0, a, W - c0);
    }
  }
}

// dk (from dS and q) or dv (from P and g) of key row a, one chunk, gathered from the ring.
template <typename T, int L>
static inline void gather_chunk(const T* __restrict ring, const T* __restrict src,
                                T* __restrict dst, int64_t C, const Dims& s, int64_t bn, int64_t a,
                                int64_t c0) {
  using V = vec<T, L>;
  const int64_t H = s.H, W = s.W, K = s.K, r = s.r, Wpp = s.Wpp, KK = s.KK;
  const int64_t HW = H * W, HWp = H * Wpp;
  const int64_t t0 = std::max<int64_t>(0, a + r - (H - 1)), t1 = std::min<int64_t>(K, a + r + 1);
  for (int64_t e0 = 0; e0 < C; e0 += CB) {
    const int ne = (int)std::min<int64_t>(CB, C - e0);
    V acc[CB];
    for (int ee = 0; ee < CB; ++ee) acc[ee] = V{};
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = a + r - t;
      const T* Pt = ring + ((i % K) * KK + t * K) * Wpp + 2 * r + c0;
      const T* sr = src + e0 * HWp + i * Wpp + 2 * r + c0;  // src: this (b, n)'s padded block
      for (int64_t u = 0; u < K; ++u) {
        const V p = ld<V>(Pt + u * Wpp - u);
        for (int ee = 0; ee < CB; ++ee)
          if (ee < ne) acc[ee] += p * ld<V>(sr + ee * HWp - u);
      }
    }
    for (int ee = 0; ee < ne; ++ee)
      st_n(dst + bn * C * HW + (e0 + ee) * HW + a * W + c0, acc[ee], W - c0);
  }
}

// One task per (b, n), pixel rows in order. P and dS of the last K rows live in a ring buffer;
// as soon as pixel row i is done, key row a = i - r has every contribution and its dk, dv are
// gathered (registers only: no read-modify-write of overlapping vectors, no atomics).
template <typename T, int LB, int LT>
void backward_impl(const BlockSource<T>& gsrc, const BlockSource<T>& qsrc,
                   const BlockSource<T>& ksrc, const BlockSource<T>& vsrc, const T* __restrict rr,
                   const T* __restrict rc, const T* __restrict lse, T* __restrict dq,
                   T* __restrict dk, T* __restrict dv, T* __restrict drel, Dims s, bool has_k,
                   bool has_rel, bool mask) {
  const int64_t D = s.D, Dv = s.Dv, H = s.H, K = s.K, r = s.r, Wpp = s.Wpp, KK = s.KK;
  at::parallel_for(0, s.BN, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qs(2 * K * LB), relacc(has_rel ? K * D * kRelStride : 0);
    // zero-initialised: the pads of every ring row stay zero
    std::vector<T> ringP(K * KK * Wpp + LB, T(0)), ringS(K * KK * Wpp + LB, T(0));
    std::vector<T> gbuf, qbuf, kbuf, vbuf;
    for (int64_t bn = begin; bn < end; ++bn) {
      const T* gbn = gsrc.block(bn, s, gbuf);
      const T* qbn = qsrc.block(bn, s, qbuf);
      const T* kb = ksrc.block(bn, s, kbuf);
      const T* vb = vsrc.block(bn, s, vbuf);
      std::fill(relacc.begin(), relacc.end(), T(0));
      auto gather_key_row = [&](int64_t a) {
        for_chunks<LB, LT>(
            s.Wv,
            [&](int64_t c0) {
              gather_chunk<T, LB>(ringP.data(), gbn, dv, Dv, s, bn, a, c0);
              if (has_k) gather_chunk<T, LB>(ringS.data(), qbn, dk, D, s, bn, a, c0);
            },
            [&](int64_t c0) {
              gather_chunk<T, LT>(ringP.data(), gbn, dv, Dv, s, bn, a, c0);
              if (has_k) gather_chunk<T, LT>(ringS.data(), qbn, dk, D, s, bn, a, c0);
            });
      };
      for (int64_t i = 0; i < H; ++i) {
        T* Ps = ringP.data() + (i % K) * KK * Wpp;
        T* Ss = ringS.data() + (i % K) * KK * Wpp;
        const T* qb = qbn + i * Wpp + r;
        const T* gb = gbn + i * Wpp + r;
        for_chunks<LB, LT>(
            s.Wv,
            [&](int64_t c0) {
              backward_chunk<T, LB>(qb, gb, kb, vb, rr, rc, lse, dq, relacc.data(), qs.data(), Ps,
                                    Ss, s, bn, i, c0, has_k, has_rel, mask);
            },
            [&](int64_t c0) {
              backward_chunk<T, LT>(qb, gb, kb, vb, rr, rc, lse, dq, relacc.data(), qs.data(), Ps,
                                    Ss, s, bn, i, c0, has_k, has_rel, mask);
            });
        if (i - r >= 0) gather_key_row(i - r);
      }
      for (int64_t a = std::max<int64_t>(0, H - r); a < H; ++a) gather_key_row(a);
      if (has_rel)
        for (int64_t x = 0; x < K * D; ++x) {
          T acc = 0;
          for (int l = 0; l < kRelStride; ++l) acc += relacc[x * kRelStride + l];
          drel[bn * K * D + x] = acc;
        }
    }
  });
}

// Chunk widths per dtype: the ISA's fp32 width, then half of it on AVX-512 (rows of 8 pixels);
// fp64 computes exactly in 8-lane vectors (a test / gradcheck dtype, not a fast path).
template <typename T>
struct Chunks {
  static constexpr int LB = sizeof(T) == 4 ? sasa::simd::kLanes : 8;
  static constexpr int LT = sizeof(T) == 4 ? (sasa::simd::kLanes > 8 ? 8 : sasa::simd::kLanes) : 8;
};

Dims make_dims(const torch::Tensor& q, const torch::Tensor& v, int64_t K, int64_t Dr, int64_t LT) {
  Dims s;
  s.BN = q.size(0) * q.size(1);
  s.D = q.size(2);
  s.Dv = v.size(2);
  s.H = q.size(3);
  s.W = q.size(4);
  s.K = K;
  s.r = K / 2;
  s.KK = K * K;
  s.Dr = Dr;
  s.Wv = (s.W + LT - 1) / LT * LT;
  s.Wpp = s.Wv + 2 * s.r;
  return s;
}

template <typename T>
const T* ptr_or_null(const torch::Tensor& t, bool use) {
  return use ? t.data_ptr<T>() : nullptr;
}

// True if all dims but the first are packed (a batch slice of a wider tensor, e.g. q of a
// fused q/k/v projection): such inputs are read in place, without a .contiguous() copy.
bool packed_after_batch(const torch::Tensor& x) {
  int64_t expect = 1;
  for (int64_t d = x.dim() - 1; d >= 1; --d) {
    if (x.size(d) != 1 && x.stride(d) != expect) return false;
    expect *= x.size(d);
  }
  return x.stride(0) >= expect || x.size(0) == 1;
}

// [.., W] -> [.., Wpp] with the row at [r, r + W) and zeros around it; several tensors of one
// dtype in a single parallel pass (one fork/join instead of one per tensor)
std::vector<torch::Tensor> pad_cols(const std::vector<torch::Tensor>& xs, int64_t r, int64_t Wpp) {
  std::vector<torch::Tensor> srcs, outs;
  std::vector<int64_t> starts{0}, rows_per_b, stride_b;
  for (const auto& x : xs) {
    auto xc = packed_after_batch(x) ? x : x.contiguous();
    const int64_t per_b = xc.size(1) * xc.size(2) * xc.size(3);
    rows_per_b.push_back(std::max<int64_t>(per_b, 1));
    stride_b.push_back(xc.size(0) == 1 ? per_b * xc.size(4) : xc.stride(0));
    srcs.push_back(xc);
    outs.push_back(
        torch::empty({xc.size(0), xc.size(1), xc.size(2), xc.size(3), Wpp}, xc.options()));
    starts.push_back(starts.back() + xc.numel() / std::max<int64_t>(xc.size(4), 1));
  }
  if (xs.empty()) return outs;
  const int64_t W = srcs[0].size(4);
  AT_DISPATCH_FLOATING_TYPES(srcs[0].scalar_type(), "sasa_pad", [&] {
    at::parallel_for(0, starts.back(), 256, [&](int64_t b, int64_t e) {
      size_t which = 0;
      for (int64_t row = b; row < e; ++row) {
        while (row >= starts[which + 1]) ++which;
        const int64_t local = row - starts[which];
        const int64_t bi = local / rows_per_b[which], rest = local % rows_per_b[which];
        const scalar_t* src = srcs[which].data_ptr<scalar_t>() + bi * stride_b[which] + rest * W;
        scalar_t* o = outs[which].data_ptr<scalar_t>() + local * Wpp;
        std::fill(o, o + r, scalar_t(0));
        std::memcpy(o + r, src, sizeof(scalar_t) * W);
        std::fill(o + r + W, o + Wpp, scalar_t(0));
      }
    });
  });
  return outs;
}

// An unpadded source: the tensor itself if packed after the batch dim, else a contiguous copy
// (kept alive in ``keep``).
template <typename T>
BlockSource<T> local_source(const torch::Tensor& x, std::vector<torch::Tensor>& keep) {
  BlockSource<T> b;
  auto xc = packed_after_batch(x) ? x : x.contiguous();
  keep.push_back(xc);
  b.base = xc.data_ptr<T>();
  b.N = xc.size(1);
  b.C = xc.size(2);
  b.stride_b = xc.size(0) == 1 ? 0 : xc.stride(0);
  b.padded = false;
  return b;
}

template <typename T>
BlockSource<T> padded_source(const torch::Tensor& xp) {
  BlockSource<T> b;
  b.base = xp.data_ptr<T>();
  b.C = xp.size(2);
  return b;
}

// Every entry point validates its inputs: shapes [B,N,*,H,W], one floating dtype (fp32 or
// fp64), CPU, odd K, embeddings [K, Dr] + [K, D - Dr].
void check_inputs(const char* fn, const torch::Tensor& q, const torch::Tensor& k,
                  const torch::Tensor& v, const torch::Tensor& rel_row,
                  const torch::Tensor& rel_col, int64_t K, bool has_k, bool has_rel) {
  TORCH_CHECK(K >= 1 && K % 2 == 1, fn, ": kernel size must be odd and >= 1, got ", K);
  TORCH_CHECK(q.dim() == 5 && v.dim() == 5, fn, ": q and v must be [B, N, D, H, W]");
  TORCH_CHECK(q.device().is_cpu() && v.device().is_cpu(), fn, ": CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, fn,
              ": float32 or float64 expected, got ", q.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), fn, ": q and v dtypes differ");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(3) == q.size(3) &&
                  v.size(4) == q.size(4),
              fn, ": v must match q in batch, heads, H and W");
  if (has_k) {
    TORCH_CHECK(k.sizes() == q.sizes(), fn, ": k must have q's shape");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && k.device().is_cpu(), fn,
                ": k must be a CPU tensor of q's dtype");
  }
  if (has_rel) {
    TORCH_CHECK(rel_row.dim() == 2 && rel_col.dim() == 2 && rel_row.size(0) == K &&
                    rel_col.size(0) == K && rel_row.size(1) + rel_col.size(1) == q.size(2),
                fn, ": rel_row [K, Dr] and rel_col [K, D - Dr] expected");
    TORCH_CHECK(rel_row.is_contiguous() && rel_col.is_contiguous(), fn,
                ": embeddings must be contiguous");
    TORCH_CHECK(
        rel_row.scalar_type() == q.scalar_type() && rel_col.scalar_type() == q.scalar_type(), fn,
        ": embeddings must have q's dtype");
  }
}

}  // namespace

std::vector<torch::Tensor> sasa_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                  torch::Tensor rel_row, torch::Tensor rel_col,
                                                  int64_t K, bool has_k, bool has_rel, bool mask) {
  check_inputs("sasa_attention_forward", q, k, v, rel_row, rel_col, K, has_k, has_rel);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(3), W = q.size(4), r = K / 2;
  auto out = torch::empty({B, N, v.size(2), H, W}, q.options());
  auto lse = torch::empty({B, N, H, W}, q.options());
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sasa_attention_forward", [&] {
    using C = Chunks<scalar_t>;
    Dims s = make_dims(q, v, K, has_rel ? rel_row.size(1) : 0, C::LT);
    std::vector<torch::Tensor> keep;
    BlockSource<scalar_t> qs, ks, vs;
    if (s.BN >= 4 * at::get_num_threads()) {  // enough (b, n) tasks: pad inside the kernel
      qs = local_source<scalar_t>(q, keep);
      vs = local_source<scalar_t>(v, keep);
      if (has_k) ks = local_source<scalar_t>(k, keep);
    } else {
      keep = pad_cols(
          has_k ? std::vector<torch::Tensor>{q, v, k} : std::vector<torch::Tensor>{q, v}, r, s.Wpp);
      qs = padded_source<scalar_t>(keep[0]);
      vs = padded_source<scalar_t>(keep[1]);
      if (has_k) ks = padded_source<scalar_t>(keep[2]);
    }
    forward_impl<scalar_t, C::LB, C::LT>(qs, ks, vs, ptr_or_null<scalar_t>(rel_row, has_rel),
                                         ptr_or_null<scalar_t>(rel_col, has_rel),
                                         out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), s,
                                         has_k, has_rel, mask);
  });
  return {out, lse};
}

std::vector<torch::Tensor> sasa_attention_backward(torch::Tensor g, torch::Tensor q,
                                                   torch::Tensor k, torch::Tensor v,
                                                   torch::Tensor rel_row, torch::Tensor rel_col,
                                                   torch::Tensor lse, int64_t K, bool has_k,
                                                   bool has_rel, bool mask) {
  check_inputs("sasa_attention_backward", q, k, v, rel_row, rel_col, K, has_k, has_rel);
  TORCH_CHECK(g.sizes() == v.sizes() && g.scalar_type() == q.scalar_type(),
              "sasa_attention_backward: grad must have the output's shape and q's dtype");
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(3) && lse.size(3) == q.size(4) &&
                  lse.scalar_type() == q.scalar_type(),
              "sasa_attention_backward: lse must be [B, N, H, W] of q's dtype");
  const int64_t B = q.size(0), N = q.size(1), D = q.size(2), H = q.size(3), W = q.size(4);
  const int64_t r = K / 2;
  auto opts = q.options();
  auto dq = torch::empty({B, N, D, H, W}, opts);
  auto drel = torch::zeros({B * N, has_rel ? K : 0, D}, opts);
  auto dk = torch::empty({B, N, has_k ? D : 0, H, W}, opts);
  auto dv = torch::empty({B, N, v.size(2), H, W}, opts);
  if (dq.numel() == 0 && dv.numel() == 0) return {dq, dk, dv, drel.sum(0)};
  auto lc = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sasa_attention_backward", [&] {
    using C = Chunks<scalar_t>;
    Dims s = make_dims(q, v, K, has_rel ? rel_row.size(1) : 0, C::LT);
    std::vector<torch::Tensor> keep;  // one task per (b, n): always padded inside the kernel
    BlockSource<scalar_t> ks;
    if (has_k) ks = local_source<scalar_t>(k, keep);
    backward_impl<scalar_t, C::LB, C::LT>(
        local_source<scalar_t>(g, keep), local_source<scalar_t>(q, keep), ks,
        local_source<scalar_t>(v, keep), ptr_or_null<scalar_t>(rel_row, has_rel),
        ptr_or_null<scalar_t>(rel_col, has_rel), lc.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
        dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), drel.data_ptr<scalar_t>(), s, has_k,
        has_rel, mask);
  });
  // [K, D]: columns < Dr are rel_row's gradient (row offset t), the rest rel_col's (offset u)
  return {dq, dk, dv, drel.sum(0)};
}
