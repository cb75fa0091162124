// SIMD helpers shared by the native sources (chain_scan.cpp, tree_levels.cpp).
#pragma once

#include <cstdint>

namespace tnkd_simd {

// One SIMD register's worth of T (GCC/Clang vector extension: 16 floats or 8 doubles; lowered
// to narrower registers where the CPU has no 512-bit ones).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 64 / sizeof(T);
};

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

}  // namespace tnkd_simd
