// SIMD helpers of chain_scan.cpp and tree_levels.cpp: a register type, register-tiled matrix
// products and a range check.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace tnkd_simd {

// One 512-bit register of T (GCC/Clang vector extension; narrower registers where the CPU has
// no 512-bit ones).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 64 / sizeof(T);
};

// n rounded up to whole registers of T (a scratch row's width, zero past n).
template <typename T>
inline int64_t padded_width(int64_t n) {
  return (n + Vec<T>::lanes - 1) / Vec<T>::lanes * Vec<T>::lanes;
}

// Whether the n values at p all lie in [low, high] (by default: are finite; false for NaN).
template <typename T>
bool all_within(const T* p, int64_t n, T low = -std::numeric_limits<T>::max(),
                T high = std::numeric_limits<T>::max()) {
  for (int64_t j = 0; j < n; ++j)
    if (!(p[j] >= low && p[j] <= high)) return false;
  return true;
}

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// A matrix read in place: element (o, (s, i)) at o*so + s*ss + i*si ({ar, 0, ak} for a plain
// matrix a[r*ar + k*ak] with one s).
struct Strides {
  int64_t so, ss, si;
};

// out[o][b] = sum_{s < m, i < inner} A(o, s, i) x[s*inner + i][b] for rows o0..o0+R-1 and NV
// registers of columns from b0 (`valid` of them stored); x (m*inner, ldx), out (rows, ldo).
// Each x row is loaded once for R rows of A.
template <typename T, int R, int NV>
inline void mm_tile(const T* __restrict A, Strides st, int64_t m, int64_t inner,
                    const T* __restrict x, int64_t ldx, T* __restrict out, int64_t ldo,
                    int64_t o0, int64_t b0, int64_t valid) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  V acc[R][NV] = {};  // zeros
  for (int64_t s = 0; s < m; ++s) {
    for (int64_t i = 0; i < inner; ++i) {
      const T* xr = x + (s * inner + i) * ldx + b0;
      const T* a = A + o0 * st.so + s * st.ss + i * st.si;
      V xv[NV];
      for (int n = 0; n < NV; ++n) xv[n] = load(xr + n * L);
      for (int r = 0; r < R; ++r) {
        const T ar = a[r * st.so];
        for (int n = 0; n < NV; ++n) acc[r][n] += ar * xv[n];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    T* o = out + (o0 + r) * ldo + b0;
    if (valid == NV * L) {
      for (int n = 0; n < NV; ++n) store(o + n * L, acc[r][n]);
    } else {
      T tmp[NV * L];
      for (int n = 0; n < NV; ++n) store(tmp + n * L, acc[r][n]);
      for (int64_t w = 0; w < valid; ++w) o[w] = tmp[w];
    }
  }
}

// mm_tile over all `rows` rows: RR at a time, then 2, then 1.
template <typename T, int RR, int NV>
inline void mm_rows(const T* A, Strides st, int64_t m, int64_t inner, int64_t rows, const T* x,
                    int64_t ldx, T* out, int64_t ldo, int64_t b0, int64_t valid) {
  int64_t o = 0;
  for (; o + RR <= rows; o += RR)
    mm_tile<T, RR, NV>(A, st, m, inner, x, ldx, out, ldo, o, b0, valid);
  for (; o + 2 <= rows; o += 2) mm_tile<T, 2, NV>(A, st, m, inner, x, ldx, out, ldo, o, b0, valid);
  for (; o < rows; ++o) mm_tile<T, 1, NV>(A, st, m, inner, x, ldx, out, ldo, o, b0, valid);
}

// G[r][c] (+)= sum_{b < batch} x[r][b] vt[b][c] for rows r0..r0+R-1 and NV registers of
// columns from c0 (`valid` of them written): x (rows, ldx), vt (batch, ldv) zero-padded to whole
// registers, G (rows, cols); `Acc` adds to G. The batch is the reduction: one broadcast and one
// FMA per register and sample, no horizontal sums.
template <typename T, int R, int NV, bool Acc>
inline void gram_tile(const T* __restrict x, int64_t ldx, const T* __restrict vt, int64_t ldv,
                      int64_t batch, T* __restrict G, int64_t cols, int64_t r0, int64_t c0,
                      int64_t valid) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  V acc[R][NV] = {};  // zeros
  for (int64_t b = 0; b < batch; ++b) {
    V vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = load(vt + b * ldv + c0 + n * L);
    for (int r = 0; r < R; ++r) {
      const T a = x[(r0 + r) * ldx + b];
      for (int n = 0; n < NV; ++n) acc[r][n] += a * vv[n];
    }
  }
  for (int r = 0; r < R; ++r) {
    T* g = G + (r0 + r) * cols + c0;
    T tmp[NV * L];
    for (int n = 0; n < NV; ++n) store(tmp + n * L, acc[r][n]);
    for (int64_t w = 0; w < valid; ++w) g[w] = Acc ? g[w] + tmp[w] : tmp[w];
  }
}

// gram_tile over all `rows` rows (8 or 4 at a time), columns c0..c0 + NV registers.
template <typename T, int NV, bool Acc>
inline void gram_rows(const T* x, int64_t rows, int64_t ldx, const T* vt, int64_t ldv,
                      int64_t batch, T* G, int64_t cols, int64_t c0) {
  const int64_t valid = std::min<int64_t>(NV * Vec<T>::lanes, cols - c0);
  constexpr int RR = NV == 1 ? 8 : 4;
  int64_t r = 0;
  for (; r + RR <= rows; r += RR)
    gram_tile<T, RR, NV, Acc>(x, ldx, vt, ldv, batch, G, cols, r, c0, valid);
  for (; r + 2 <= rows; r += 2)
    gram_tile<T, 2, NV, Acc>(x, ldx, vt, ldv, batch, G, cols, r, c0, valid);
  for (; r < rows; ++r) gram_tile<T, 1, NV, Acc>(x, ldx, vt, ldv, batch, G, cols, r, c0, valid);
}

// G (rows, cols) = x (rows, ldx) @ vt (batch, ldv), or G += it with `Acc`; vt is zero-padded to
// whole registers (ldv >= padded_width(cols)). Two registers of columns at a time, then one.
template <typename T, bool Acc>
void gram(const T* x, int64_t rows, int64_t ldx, const T* vt, int64_t ldv, int64_t batch, T* G,
          int64_t cols) {
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t c0 = 0; c0 < cols; c0 += 2 * L) {
    if (cols - c0 > L)
      gram_rows<T, 2, Acc>(x, rows, ldx, vt, ldv, batch, G, cols, c0);
    else
      gram_rows<T, 1, Acc>(x, rows, ldx, vt, ldv, batch, G, cols, c0);
  }
}

}  // namespace tnkd_simd
