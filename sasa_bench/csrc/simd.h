// Shared SIMD layer of the CPU kernels: one vector type, one exp, loads and stores with tails.
//
// The instruction set is chosen at build time (sasa_bench/kernels/cpp_build.py passes -march and
// SASA_ISA_*): AVX-512 (16 fp32 lanes, 32 registers), AVX2 + FMA (8 lanes, 16 registers) or a
// portable path (GCC vector extensions that the compiler maps to SSE2 / NEON, 4 lanes). The
// kernels are written once against vec<T, L>; kLanes is the natural width of a vector register
// for fp32, so that the kernels' register blocking (8 accumulators) fits the register file of
// every ISA: 16-lane vectors on AVX2 would take two ymm registers each and spill.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(SASA_ISA_PORTABLE)
#define SASA_SIMD_AVX512 0
#define SASA_SIMD_AVX2 0
#elif defined(__AVX512F__)
#define SASA_SIMD_AVX512 1
#define SASA_SIMD_AVX2 1
#elif defined(__AVX2__) && defined(__FMA__)
#define SASA_SIMD_AVX512 0
#define SASA_SIMD_AVX2 1
#else
#define SASA_SIMD_AVX512 0
#define SASA_SIMD_AVX2 0
#endif

#if SASA_SIMD_AVX2
#include <immintrin.h>
#endif

namespace sasa {
namespace simd {

#if SASA_SIMD_AVX512
constexpr int kLanes = 16;  // fp32 lanes of one register
constexpr const char* kIsa = "avx512";
#elif SASA_SIMD_AVX2
constexpr int kLanes = 8;
constexpr const char* kIsa = "avx2";
#else
constexpr int kLanes = 4;
constexpr const char* kIsa = "portable";
#endif

// vec<T, L>: L lanes of T (GCC/Clang vector extension); ivec: same-width integer lanes.
template <typename T, int L>
struct VT {
  typedef T type __attribute__((vector_size(sizeof(T) * L)));
  using IT = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef IT itype __attribute__((vector_size(sizeof(T) * L)));
};
template <typename T, int L>
using vec = typename VT<T, L>::type;

template <typename V>
static inline V ld(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
static inline void st(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
// Store the first n lanes only (n may exceed the width: then the whole vector).
template <typename T, typename V>
static inline void st_n(T* p, V v, int64_t n) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  if (n >= L) {
    st(p, v);
  } else if (n > 0) {
    std::memcpy(p, &v, sizeof(T) * n);
  }
}
// Load the first n lanes, zeros elsewhere.
template <typename T, typename V>
static inline V ld_n(const T* p, int64_t n) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  if (n >= L) return ld<V>(p);
  V v = V{};
  if (n > 0) std::memcpy(&v, p, sizeof(T) * n);
  return v;
}
template <typename T, int L>
static inline vec<T, L> splat(T x) {
  return vec<T, L>{} + x;
}
template <typename V>
static inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// exp for the softmax: Cody-Waite reduction and a degree-6 polynomial (relative error ~2e-7);
// exactly 0 below -87 (and for -inf), clamped at 88. One algorithm on every ISA, branch-free in
// vector extensions (the compiler emits FMAs, compares and blends of the target's width: 8-lane
// ymm code on AVX2, 4-lane xmm / NEON on the portable path); AVX-512 spells the rounding and the
// 2^n rebuild as one instruction each (vrndscaleps, vscalefps). fp64 uses std::exp lane by lane.
namespace detail {
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

template <int L>
static inline vec<float, L> exp_generic(vec<float, L> x) {
  using V = vec<float, L>;
  using I = typename VT<float, L>::itype;
  const V lo = V{} + -87.0f, hi = V{} + 88.0f;
  auto under = x < lo;
  V xc = under ? lo : x;
  xc = xc > hi ? hi : xc;
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  V fn = (xc * kLog2e + magic) - magic;
  V r = xc - fn * kLn2Hi;
  r = r - fn * kLn2Lo;
  V p = V{} + kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r * r + r + 1.0f;
  I n = __builtin_convertvector(fn, I);
  I bits = (n + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  V y = p * scale;
  return under ? V{} : y;
}

#if SASA_SIMD_AVX512
static inline __m512 exp16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(keep, p, fn);
}
#endif

}  // namespace detail

template <typename T, int L>
static inline vec<T, L> vexp(vec<T, L> x) {
  using V = vec<T, L>;
  if constexpr (sizeof(T) == 8) {
    V y;
    for (int l = 0; l < L; ++l) y[l] = std::exp(x[l]);
    return y;
  } else {
#if SASA_SIMD_AVX512
    if constexpr (L == 16) return (V)detail::exp16((__m512)x);
#endif
    return detail::exp_generic<L>(x);
  }
}

// wvec<T, N>: N lanes of T held as N / NL native registers (NL = the ISA's natural width for T),
// for kernels whose rows have a fixed width that is not the ISA's (the stem's 16 query
// positions). A plain vec<T, 16> is one zmm on AVX-512, but without AVX-512 GCC has no machine
// mode for a 64-byte vector and keeps every such value in memory (measured: the stem 4-6x slower
// on AVX2); an array of native vectors stays in registers on every ISA.
template <typename T>
constexpr int native_lanes() {
  return kLanes * 4 / static_cast<int>(sizeof(T));
}
template <typename T, int N>
struct wvec {
  static constexpr int NL = native_lanes<T>() < N ? native_lanes<T>() : N;
  static constexpr int NV = N / NL;
  static_assert(N % NL == 0, "width must be a multiple of the native width");
  using R = vec<T, NL>;
  R r[NV];

  // Lane i, read from memory: the rows indexed by a loop variable live in arrays, and an
  // element of a register value would be a store + reload through the stack.
  T operator[](int i) const {
    T x;
    std::memcpy(&x, reinterpret_cast<const char*>(this) + i * sizeof(T), sizeof(T));
    return x;
  }
  // Loads and stores register by register (a memcpy of the whole struct is lowered to 16-byte
  // moves through the stack, and the register reload then stalls on store forwarding).
  static inline wvec load(const T* p) {
    wvec o;
    for (int k = 0; k < NV; ++k) o.r[k] = ld<R>(p + k * NL);
    return o;
  }
  inline void store(T* p) const {
    for (int k = 0; k < NV; ++k) st(p + k * NL, r[k]);
  }
  static inline wvec splat(T x) {
    wvec o;
    for (int k = 0; k < NV; ++k) o.r[k] = R{} + x;
    return o;
  }
#define SASA_WVEC_OP(op)                                    \
  friend inline wvec operator op(wvec a, const wvec& b) {   \
    for (int k = 0; k < NV; ++k) a.r[k] = a.r[k] op b.r[k]; \
    return a;                                               \
  }                                                         \
  friend inline wvec operator op(wvec a, T b) {             \
    for (int k = 0; k < NV; ++k) a.r[k] = a.r[k] op b;      \
    return a;                                               \
  }                                                         \
  friend inline wvec operator op(T a, wvec b) {             \
    for (int k = 0; k < NV; ++k) b.r[k] = a op b.r[k];      \
    return b;                                               \
  }                                                         \
  inline wvec& operator op## = (const wvec& b) {            \
    for (int k = 0; k < NV; ++k) r[k] = r[k] op b.r[k];     \
    return *this;                                           \
  }                                                         \
  inline wvec& operator op## = (T b) {                      \
    for (int k = 0; k < NV; ++k) r[k] = r[k] op b;          \
    return *this;                                           \
  }
  SASA_WVEC_OP(+)
  SASA_WVEC_OP(-)
  SASA_WVEC_OP(*)
  SASA_WVEC_OP(/)
#undef SASA_WVEC_OP
};

template <typename T, int N>
static inline wvec<T, N> vmax(wvec<T, N> a, const wvec<T, N>& b) {
  for (int k = 0; k < wvec<T, N>::NV; ++k) a.r[k] = vmax(a.r[k], b.r[k]);
  return a;
}
template <typename T, int N>
static inline wvec<T, N> vexp(wvec<T, N> a) {
  for (int k = 0; k < wvec<T, N>::NV; ++k) a.r[k] = vexp<T, wvec<T, N>::NL>(a.r[k]);
  return a;
}
// Horizontal max of all N lanes: across the registers, then a shuffle tree inside one.
template <typename T, int N>
static inline T hmax(const wvec<T, N>& a) {
  using W = wvec<T, N>;
  typename W::R v = a.r[0];
  for (int k = 1; k < W::NV; ++k) v = vmax(v, a.r[k]);
  if constexpr (W::NL == 16) {
    v = vmax(v,
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = vmax(v,
             __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = vmax(v,
             __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = vmax(v,
             __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  } else if constexpr (W::NL == 8) {
    v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
    v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  } else if constexpr (W::NL == 4) {
    v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1));
    v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2));
  } else if constexpr (W::NL == 2) {
    v = vmax(v, __builtin_shufflevector(v, v, 1, 0));
  }
  return v[0];
}

}  // namespace simd
}  // namespace sasa
