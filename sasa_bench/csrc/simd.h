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

}  // namespace simd
}  // namespace sasa
