// The matrix-vector products shared by moegpt's CPU decode kernels (gemv.cpp, decode_layer.cpp).
//
// product(x, w, ...): x (M, I) fp32 times a weight w given as nn.Linear stores it, (O, I), -> (M, O)
// fp32, for the few rows of a decode step. The weight may be stored (in, out) (the decode layout of
// fp32 weights) or (out, in); fp32 or bf16, accumulated in fp32. Each thread streams one contiguous
// block of the weight's stored rows, one row at a time: what reached ~0.94 of the read bandwidth on a
// 2-core EPYC at batch 1 (row blocking and software prefetch were slower there).

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace moegpt {


inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// w stored (I, O) with row stride ld: out[m, o] = sum_i x[m, i] * w[i, o]. Threads split the I
// rows; each accumulates its own (M, O) partial sums, added at the end.
template <typename T>
inline void gemv_in_by_out(const float* x, const T* w, int64_t M, int64_t I, int64_t O, int64_t ld, float* out) {
  const int nt = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(I)));
  std::vector<float> partial(static_cast<size_t>(nt) * M * O, 0.0f);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t i0 = I * t / n, i1 = I * (t + 1) / n;
    float* acc = partial.data() + static_cast<size_t>(t) * M * O;
    for (int64_t i = i0; i < i1; ++i) {
      const T* row = w + i * ld;
      for (int64_t m = 0; m < M; ++m) {
        const float xm = x[m * I + i];
        float* a = acc + m * O;
#pragma omp simd
        for (int64_t o = 0; o < O; ++o) a[o] += xm * to_float(row[o]);
      }
    }
  }
  for (int64_t k = 0; k < M * O; ++k) {
    float s = 0.0f;
    for (int t = 0; t < nt; ++t) s += partial[static_cast<size_t>(t) * M * O + k];
    out[k] = s;
  }
}

// Matrices smaller than this run on one thread (a fork/join costs more than the second core saves).
constexpr int64_t ONE_THREAD_BYTES = 96 * 1024;

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits shifted into the high half
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// out[m * O] = dot(x[m], row) for MR rows of x (row stride I): the weight row is loaded once for
// all MR rows, two accumulators per row. Each row's additions happen in the same order whatever MR,
// so a row's result does not depend on the rows beside it.
template <typename T, int MR>
inline void dot_rows(const float* x, const T* row, int64_t I, float* out, int64_t O) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= I; i += 32) {
    const __m512 w0 = load16(row + i), w1 = load16(row + i + 16);
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * I + i), w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * I + i + 16), w1, acc[m][1]);
    }
  }
  for (; i < I; i += 16) {
    const __mmask16 k = I - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (I - i)) - 1);
    const __m512 w0 = load16(row + i, k);
    for (int m = 0; m < MR; ++m) acc[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + m * I + i), w0, acc[m][0]);
  }
  for (int m = 0; m < MR; ++m) out[m * O] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

template <typename T>
inline void dot_all_rows(const float* x, const T* row, int64_t M, int64_t I, float* out, int64_t O) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dot_rows<T, 4>(x + m * I, row, I, out + m * O, O);
  switch (M - m) {
    case 3: dot_rows<T, 3>(x + m * I, row, I, out + m * O, O); break;
    case 2: dot_rows<T, 2>(x + m * I, row, I, out + m * O, O); break;
    case 1: dot_rows<T, 1>(x + m * I, row, I, out + m * O, O); break;
    default: break;
  }
}
#else
template <typename T>
inline void dot_all_rows(const float* x, const T* row, int64_t M, int64_t I, float* out, int64_t O) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * I;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < I; ++i) acc += xm[i] * to_float(row[i]);
    out[m * O] = acc;
  }
}
#endif

// w stored (O, I) with row stride ld: out[m, o] = dot(x[m], w[o]). Threads split the O rows; each
// weight row is read once for all M rows of x.
template <typename T>
inline void gemv_out_by_in(const float* x, const T* w, int64_t M, int64_t I, int64_t O, int64_t ld, float* out) {
  int nt = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(O)));
  if (O * I * static_cast<int64_t>(sizeof(T)) < ONE_THREAD_BYTES) nt = 1;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t o0 = O * t / n, o1 = O * (t + 1) / n;
    for (int64_t o = o0; o < o1; ++o) dot_all_rows(x, w + o * ld, M, I, out + o, O);
  }
}

// out (M, O) = x (M, I) fp32 times w (O, I) stored either way (strides so, si of its O and I dims).
template <typename T>
inline void product(const float* x, const T* w, int64_t M, int64_t I, int64_t O, int64_t so, int64_t si, float* out) {
  if (so == 1 && O > 1) {
    gemv_in_by_out(x, w, M, I, O, si, out);
  } else {
    gemv_out_by_in(x, w, M, I, O, so, out);
  }
}

inline bool stored_either_way(int64_t so, int64_t si, int64_t O) { return (so == 1 && O > 1) || si == 1; }

}  // namespace moegpt
