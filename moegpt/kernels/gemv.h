// The matrix-vector products shared by moegpt's CPU decode kernels (gemv.cpp, decode_layer.cpp).
//
// product(x, w, ...): x (M, I) fp32 times a weight w given as nn.Linear stores it, (O, I), -> (M, O)
// fp32, for the few rows of a decode step. The weight may be stored (in, out) or (out, in) (nn.Linear's
// layout, the one the kernels read fastest); fp32 or bf16, accumulated in fp32. Each thread streams
// one contiguous block of the weight's stored rows (see dot_range for the tiles, prefetching and
// blocking, and the measurements behind them).

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
constexpr int64_t PREFETCH_ROWS = 4;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// The (out, in) kernels: each output is a dot product of a row of x and a row of the weight, in
// vectors of L lanes, two accumulators per output (even and odd vectors), a masked tail into the
// first, one horizontal sum. Every output is summed in this order whatever the tile it is computed
// in, so a row of x gets bitwise the same result alone or beside other rows (batch invariance).
//
// Three element kinds: fp32 weights and x; bf16 weights widened to fp32 against fp32 x; bf16
// weights and bf16 x (VDPBF16PS: 32 exact products summed into 16 fp32 lanes per instruction).
struct Fp32 {
  using W = float;
  using X = float;
  using Mask = __mmask16;
  static constexpr int64_t L = 16;
  static __m512 w(const W* p) { return _mm512_loadu_ps(p); }
  static __m512 w(const W* p, Mask k) { return _mm512_maskz_loadu_ps(k, p); }
  static __m512 x(const X* p) { return _mm512_loadu_ps(p); }
  static __m512 x(const X* p, Mask k) { return _mm512_maskz_loadu_ps(k, p); }
  static __m512 fma(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
  static Mask mask(int64_t n) { return n >= L ? static_cast<Mask>(0xFFFF) : static_cast<Mask>((1u << n) - 1); }
};

struct Bf16Widened {
  using W = c10::BFloat16;
  using X = float;
  using Mask = __mmask16;
  static constexpr int64_t L = 16;
  static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static __m512 w(const W* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 w(const W* p, Mask k) { return widen(_mm256_maskz_loadu_epi16(k, p)); }
  static __m512 x(const X* p) { return _mm512_loadu_ps(p); }
  static __m512 x(const X* p, Mask k) { return _mm512_maskz_loadu_ps(k, p); }
  static __m512 fma(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
  static Mask mask(int64_t n) { return n >= L ? static_cast<Mask>(0xFFFF) : static_cast<Mask>((1u << n) - 1); }
};

#if defined(__AVX512BF16__)
struct Bf16Dot {
  using W = c10::BFloat16;
  using X = c10::BFloat16;
  using Mask = __mmask32;
  static constexpr int64_t L = 32;
  static __m512bh w(const W* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh w(const W* p, Mask k) { return (__m512bh)_mm512_maskz_loadu_epi16(k, p); }
  static __m512bh x(const X* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh x(const X* p, Mask k) { return (__m512bh)_mm512_maskz_loadu_epi16(k, p); }
  static __m512 fma(__m512 acc, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(acc, a, b); }
  static Mask mask(int64_t n) { return n >= L ? ~static_cast<Mask>(0) : static_cast<Mask>((1u << n) - 1); }
};
constexpr bool HAS_BF16_DOT = true;
#else
constexpr bool HAS_BF16_DOT = false;
#endif

// out[m * O + r] = dot(x[m], w[r]) for MR rows of x (row stride I) and NR weight rows (stride ld):
// each weight vector is loaded once for the MR rows, each x vector once for the NR rows. ahead: NR
// weight rows to prefetch while these are multiplied (nullptr: none).
template <class K, int MR, int NR>
inline void dot_tile(const typename K::X* x, const typename K::W* w, int64_t ld, int64_t I, float* out, int64_t O,
                     const typename K::W* ahead) {
  constexpr int64_t L = K::L;
  __m512 acc[MR][NR][2];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * L <= I; i += 2 * L) {
    if (ahead != nullptr) {
      for (int r = 0; r < NR; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + r * ld + i), _MM_HINT_T2);
        if constexpr (2 * L * sizeof(typename K::W) > 64)  // the chunk spans two cache lines
          _mm_prefetch(reinterpret_cast<const char*>(ahead + r * ld + i + L), _MM_HINT_T2);
      }
    }
    decltype(K::w(w)) w0[NR], w1[NR];
    for (int r = 0; r < NR; ++r) {
      w0[r] = K::w(w + r * ld + i);
      w1[r] = K::w(w + r * ld + i + L);
      // in registers, not folded into each FMA as a memory operand: that loads each weight vector
      // MR times (measured: 24 loads per 16 FMAs, 0.44 FMAs a cycle, at 4 rows x 2 weight rows)
      asm("" : "+v"(w0[r]), "+v"(w1[r]));
    }
    for (int m = 0; m < MR; ++m) {
      const auto x0 = K::x(x + m * I + i), x1 = K::x(x + m * I + i + L);
      for (int r = 0; r < NR; ++r) {
        acc[m][r][0] = K::fma(acc[m][r][0], x0, w0[r]);
        acc[m][r][1] = K::fma(acc[m][r][1], x1, w1[r]);
      }
    }
  }
  for (; i < I; i += L) {
    const auto k = K::mask(I - i);
    for (int r = 0; r < NR; ++r) {
      const auto wr = K::w(w + r * ld + i, k);
      for (int m = 0; m < MR; ++m) acc[m][r][0] = K::fma(acc[m][r][0], K::x(x + m * I + i, k), wr);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) out[m * O + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][r][0], acc[m][r][1]));
}

// Weight rows [o0, o1) against rows [m0, m1) of x (at most 4: one tile's rows).
template <class K>
inline void dot_block(const typename K::X* x, const typename K::W* w, int64_t ld, int64_t m0, int64_t m1, int64_t I,
                      float* out, int64_t O, int64_t o0, int64_t o1, int64_t end, bool prefetch, int64_t step) {
  const int64_t M = m1 - m0;
  x += m0 * I;
  out += m0 * O;
  int64_t o = o0;
  for (; o + step <= o1; o += step) {
    const typename K::W* ahead = prefetch && o + PREFETCH_ROWS + step <= end ? w + (o + PREFETCH_ROWS) * ld : nullptr;
    if (step == 2) {
      switch (M) {
        case 4: dot_tile<K, 4, 2>(x, w + o * ld, ld, I, out + o, O, ahead); break;
        case 3: dot_tile<K, 3, 2>(x, w + o * ld, ld, I, out + o, O, ahead); break;
        case 2: dot_tile<K, 2, 2>(x, w + o * ld, ld, I, out + o, O, ahead); break;
        default: dot_tile<K, 1, 2>(x, w + o * ld, ld, I, out + o, O, ahead); break;
      }
    } else {
      switch (M) {
        case 4: dot_tile<K, 4, 1>(x, w + o * ld, ld, I, out + o, O, ahead); break;
        case 3: dot_tile<K, 3, 1>(x, w + o * ld, ld, I, out + o, O, ahead); break;
        case 2: dot_tile<K, 2, 1>(x, w + o * ld, ld, I, out + o, O, ahead); break;
        default: dot_tile<K, 1, 1>(x, w + o * ld, ld, I, out + o, O, ahead); break;
      }
    }
  }
  for (; o < o1; ++o) {
    switch (M) {
      case 4: dot_tile<K, 4, 1>(x, w + o * ld, ld, I, out + o, O, nullptr); break;
      case 3: dot_tile<K, 3, 1>(x, w + o * ld, ld, I, out + o, O, nullptr); break;
      case 2: dot_tile<K, 2, 1>(x, w + o * ld, ld, I, out + o, O, nullptr); break;
      default: dot_tile<K, 1, 1>(x, w + o * ld, ld, I, out + o, O, nullptr); break;
    }
  }
}

// Weight rows [o0, o1) against all M rows of x. Up to 4 rows of x: one pass, each weight row read
// once. More: the weight rows in blocks that stay in L2 (L2_BLOCK_BYTES), each block against every
// group of 4 rows of x (which stay in L1), so the weights are read from memory once and the rows of
// x are not re-read from L2 for every weight row.
// One weight row at a time for a few rows of x (two rows read side by side stream slower: 0.66 vs
// 0.94 of the read bandwidth at one row), two from PAIR_ROWS rows of x on, where loads, not the
// memory, bound the product. Prefetching PREFETCH_ROWS ahead (to L2/L3): fp32 from 3 rows of x
// (0.54-0.73 -> 0.82-0.89 at 3-4 rows; at 1-2 it cost 10-20%), bf16 dot products from 2 rows (a
// batch-16 step of small: 0.41-0.54 -> 0.65-0.68 of the paired sum at ~44 GB/s). At one bf16 row it
// gained ~3% while the machine read ~33 GB/s (0.88-0.93 vs 0.84-0.89) and lost more at ~44 GB/s
// (0.81 vs 0.87-0.89; 175 vs 195-199 tok/s), so one row streams on the hardware prefetcher alone.
constexpr int64_t PAIR_ROWS = 8;
constexpr int64_t L2_BLOCK_BYTES = 192 * 1024;

template <class K>
inline void dot_range(const typename K::X* x, const typename K::W* w, int64_t ld, int64_t M, int64_t I, float* out,
                      int64_t O, int64_t o0, int64_t o1) {
  const bool prefetch = M >= (sizeof(typename K::X) == 2 ? 2 : 3);
  const int64_t step = M >= PAIR_ROWS ? 2 : 1;
  if (M <= 4) {
    dot_block<K>(x, w, ld, 0, M, I, out, O, o0, o1, o1, prefetch, step);
    return;
  }
  const int64_t block = std::max<int64_t>(2, L2_BLOCK_BYTES / (I * static_cast<int64_t>(sizeof(typename K::W))));
  for (int64_t b0 = o0; b0 < o1; b0 += block) {
    const int64_t b1 = std::min(o1, b0 + block);
    for (int64_t m0 = 0; m0 < M; m0 += 4)  // the first group reads the block from memory (and prefetches)
      dot_block<K>(x, w, ld, m0, std::min(M, m0 + 4), I, out, O, b0, b1, o1, prefetch && m0 == 0, step);
  }
}
#else
constexpr bool HAS_BF16_DOT = false;
#endif

// One product of gemv_out_by_in_many: out (M, O) = x (M, I) fp32 times w stored (O, I) with row
// stride ld.
template <typename T>
struct OutByIn {
  const float* x;
  const T* w;
  int64_t M, I, O, ld;
  float* out;
};

// Several products in one parallel region (a step's chosen experts: one fork and join, and each core
// streams on from one matrix into the next): each thread takes its share of every product's weight
// rows; each weight row is read once for all M rows of x. x_is_bf16: x's values are bf16 values (x
// came from a bf16 tensor), so a bf16 weight may take the bf16 dot product. A row's result does not
// depend on the other products or the thread that computes it.
template <typename T>
inline void gemv_out_by_in_many(const OutByIn<T>* jobs, int64_t n_jobs, bool x_is_bf16 = false) {
  int64_t bytes = 0, rows = 1;
  for (int64_t j = 0; j < n_jobs; ++j) {
    bytes += jobs[j].O * jobs[j].I * static_cast<int64_t>(sizeof(T));
    rows = std::max(rows, jobs[j].O);
  }
  int nt = std::max(1, static_cast<int>(std::min<int64_t>(at::get_num_threads(), rows)));
  if (bytes < ONE_THREAD_BYTES) nt = 1;
  std::vector<std::vector<c10::BFloat16>> xb(n_jobs);
  if (std::is_same_v<T, c10::BFloat16> && HAS_BF16_DOT && x_is_bf16) {
    for (int64_t j = 0; j < n_jobs; ++j) {
      const OutByIn<T>& p = jobs[j];
      xb[j].resize(p.M * p.I);
      for (int64_t k = 0; k < p.M * p.I; ++k) xb[j][k] = static_cast<c10::BFloat16>(p.x[k]);  // exact
    }
  }
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    for (int64_t j = 0; j < n_jobs; ++j) {
      const OutByIn<T>& p = jobs[j];
      const int64_t o0 = p.O * t / n, o1 = p.O * (t + 1) / n;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      if constexpr (std::is_same_v<T, float>) {
        dot_range<Fp32>(p.x, p.w, p.ld, p.M, p.I, p.out, p.O, o0, o1);
      } else {
#if defined(__AVX512BF16__)
        if (!xb[j].empty()) {
          dot_range<Bf16Dot>(xb[j].data(), p.w, p.ld, p.M, p.I, p.out, p.O, o0, o1);
        } else {
          dot_range<Bf16Widened>(p.x, p.w, p.ld, p.M, p.I, p.out, p.O, o0, o1);
        }
#else
        dot_range<Bf16Widened>(p.x, p.w, p.ld, p.M, p.I, p.out, p.O, o0, o1);
#endif
      }
#else
      for (int64_t o = o0; o < o1; ++o) {
        const T* row = p.w + o * p.ld;
        for (int64_t m = 0; m < p.M; ++m) {
          const float* xm = p.x + m * p.I;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < p.I; ++i) acc += xm[i] * to_float(row[i]);
          p.out[m * p.O + o] = acc;
        }
      }
#endif
    }
  }
}

// w stored (O, I) with row stride ld: out[m, o] = dot(x[m], w[o]) (one product of the above).
template <typename T>
inline void gemv_out_by_in(const float* x, const T* w, int64_t M, int64_t I, int64_t O, int64_t ld, float* out,
                           bool x_is_bf16 = false) {
  const OutByIn<T> job{x, w, M, I, O, ld, out};
  gemv_out_by_in_many(&job, 1, x_is_bf16);
}

// out (M, O) = x (M, I) fp32 times w (O, I) stored either way (strides so, si of its O and I dims).
template <typename T>
inline void product(const float* x, const T* w, int64_t M, int64_t I, int64_t O, int64_t so, int64_t si, float* out,
                    bool x_is_bf16 = false) {
  if (M == 0 || O == 0) return;
  if (I == 0) {  // an empty sum
    std::fill(out, out + M * O, 0.0f);
    return;
  }
  if (so == 1 && O > 1) {
    gemv_in_by_out(x, w, M, I, O, si, out);
  } else {
    gemv_out_by_in(x, w, M, I, O, so, out, x_is_bf16);
  }
}

inline bool stored_either_way(int64_t so, int64_t si, int64_t O) { return (so == 1 && O > 1) || si == 1; }

}  // namespace moegpt
