// Matrix-vector products with quantized weights (moegpt/quant/scheme.py), for the few rows of a
// decode step: x (M, I) fp32 times w (O, I) stored as bytes, -> (M, O) fp32:
//
//   out[m, o] = sum_g scale[o, g] * sum_{i in group g} x[m, i] * q[o, i]
//
// Where I is a multiple of 128 the activations are quantized to int8 first (as llama.cpp's q8
// activations, below: int8_activation_product); the fp32-activation products are for other shapes.
//
// w (O, P): int8 one value per byte, int4 two (the even-indexed one in the low nibble), each stored
// unsigned with an offset of 2^(bits-1); scale (O, G) fp32, G groups of I / G inputs (G = 1: one
// scale per output channel). The activations stay fp32 (bf16 values for a bf16 model), so a product
// differs from x @ dequantize(w).T only by fp32 rounding (the oracle in moegpt/quant/scheme.py).
//
// Each weight row is widened 16 values at a time (int8: flip the offset bit, sign-extend, convert;
// int4: split the nibbles, subtract 8, convert) and multiplied into four (int8) or two (int4)
// accumulator chains per row of x; a group's sum is scaled once. Every output is summed in the
// same order whatever the number of rows, so a row of x gets bitwise the same result alone or beside
// others (batch invariance). For int4, x is first rearranged in blocks of 32 (the 16 even-indexed
// inputs, then the 16 odd ones) to match the nibbles.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace moegpt {

struct Quantized {
  const uint8_t* w;  // (O, P) rows of ld bytes
  const float* scale;  // (O, G) rows of lds floats
  int64_t bits, G, ld, lds;
};

// x rearranged for int4: each block of 32 inputs as its 16 even-indexed values, then its 16 odd ones.
inline std::vector<float> int4_order(const float* x, int64_t M, int64_t I) {
  std::vector<float> xd(M * I);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < I; b += 32)
      for (int64_t j = 0; j < 16; ++j) {
        xd[m * I + b + j] = x[m * I + b + 2 * j];
        xd[m * I + b + 16 + j] = x[m * I + b + 2 * j + 1];
      }
  return xd;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
inline __m512 widen_int8(__m128i bytes) {  // 16 stored bytes -> their int8 values as fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_xor_si128(bytes, _mm_set1_epi8(static_cast<char>(0x80)))));
}

// out[m * O] for MR rows of x and one int8 weight row w (I bytes) with scales s (G).
template <int MR>
inline void int8_row(const float* x, int64_t I, const uint8_t* w, const float* s, int64_t G, float* out, int64_t O) {
  const int64_t gs = I / G;
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 c[MR][4];
    for (int m = 0; m < MR; ++m) c[m][0] = c[m][1] = c[m][2] = c[m][3] = _mm512_setzero_ps();
    const int64_t end = (g + 1) * gs;
    int64_t i = g * gs;
    for (; i + 64 <= end; i += 64) {
      __m512 wv[4];
      for (int k = 0; k < 4; ++k) {
        wv[k] = widen_int8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 16 * k)));
        asm("" : "+v"(wv[k]));  // in a register for the MR rows (see dot_tile in gemv.h)
      }
      for (int m = 0; m < MR; ++m)
        for (int k = 0; k < 4; ++k) c[m][k] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * I + i + 16 * k), wv[k], c[m][k]);
    }
    for (; i < end; i += 16) {  // the group's tail into the first chain (x is zero past the end)
      const __mmask16 k = end - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (end - i)) - 1);
      const __m512 wv = widen_int8(_mm_maskz_loadu_epi8(k, w + i));
      for (int m = 0; m < MR; ++m) c[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + m * I + i), wv, c[m][0]);
    }
    const __m512 sg = _mm512_set1_ps(s[g]);
    for (int m = 0; m < MR; ++m)
      acc[m] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(c[m][0], c[m][1]), _mm512_add_ps(c[m][2], c[m][3])), sg, acc[m]);
  }
  for (int m = 0; m < MR; ++m) out[m * O] = _mm512_reduce_add_ps(acc[m]);
}

// The same for one int4 weight row (I / 2 bytes), x in int4_order; I and the group size are
// multiples of 32.
template <int MR>
inline void int4_row(const float* x, int64_t I, const uint8_t* w, const float* s, int64_t G, float* out, int64_t O) {
  const int64_t gs = I / G;
  const __m512i low = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 ce[MR], co[MR];
    for (int m = 0; m < MR; ++m) ce[m] = co[m] = _mm512_setzero_ps();
    for (int64_t i = g * gs; i < (g + 1) * gs; i += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i / 2)));
      __m512 we = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, low), eight));  // even-indexed inputs
      __m512 wo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));  // odd-indexed
      asm("" : "+v"(we), "+v"(wo));
      for (int m = 0; m < MR; ++m) {
        ce[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * I + i), we, ce[m]);
        co[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * I + i + 16), wo, co[m]);
      }
    }
    const __m512 sg = _mm512_set1_ps(s[g]);
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(ce[m], co[m]), sg, acc[m]);
  }
  for (int m = 0; m < MR; ++m) out[m * O] = _mm512_reduce_add_ps(acc[m]);
}

template <int MR>
inline void quantized_row(const float* x, int64_t I, const Quantized& q, int64_t o, float* out, int64_t O) {
  const uint8_t* w = q.w + o * q.ld;
  const float* s = q.scale + o * q.lds;
  if (q.bits == 8) {
    int8_row<MR>(x, I, w, s, q.G, out + o, O);
  } else {
    int4_row<MR>(x, I, w, s, q.G, out + o, O);
  }
}
#endif

// The value of element i of a stored row (the scalar path and its checks).
inline int quantized_value(const uint8_t* w, int64_t i, int64_t bits) {
  if (bits == 8) return static_cast<int>(w[i]) - 128;
  const uint8_t b = w[i / 2];
  return static_cast<int>(i % 2 ? b >> 4 : b & 0xF) - 8;
}

// ---- int8 activations (where I is a multiple of 128: every product of a real model) ----
// x quantized per row in blocks of BLOCK inputs, as llama.cpp's q8 activations (moegpt/quant/
// scheme.py: quantize_activations): sx = max |x| / 127, xq = round(x / sx). A 64-input chunk of a
// weight row is 64 unsigned bytes (int4: the 32 low nibbles, the even inputs, then the 32 high ones,
// the odd inputs) and xq is laid out in the same order, so one VPDPBUSD takes 64 products into 16
// int32 lanes. Per channel, a block's chunks accumulate in int32 and the block costs one convert and
// one FMA; per group, each chunk's lanes are scaled by their groups' weight scales. The stored
// offset (128 or 8) adds offset * sum(xq) to every product, a term that depends on the activations
// only: it is summed once per row of x and group (offsets below) and taken off at the end.
constexpr int64_t BLOCK = 128;
constexpr int64_t PREFETCH_AHEAD = 16;  // weight rows ahead of the tile being multiplied

// One block of BLOCK activations -> its scale and xq (xq = round(x / s), s = max |x| / 127; 0 where
// the block is all zero), as scheme.py's quantize_activations computes them (division, ties to even).
inline float quantize_block(const float* x, int8_t* q) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < BLOCK; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  const float s = _mm512_reduce_max_ps(amax) / 127.0f;
  if (s == 0.0f) {
    std::fill(q, q + BLOCK, int8_t{0});
    return s;
  }
  const __m512 sv = _mm512_set1_ps(s), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
  for (int64_t i = 0; i < BLOCK; i += 16) {
    const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, r)))));
  }
  return s;
#else
  float amax = 0.0f;
  for (int64_t i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax / 127.0f;
  for (int64_t i = 0; i < BLOCK; ++i)
    q[i] = s > 0.0f ? static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(x[i] / s)))) : 0;
  return s;
#endif
}

struct Int8Rows {
  std::vector<int8_t> q;  // (M, I): each 64-input chunk in the weight's byte order
  std::vector<float> sx;  // (M, I / BLOCK): each block's scale
  std::vector<float> offsets;  // (M, G): offset * sum over group g of sx * xq
};

// The input at byte k of a 64-input chunk.
inline int64_t chunk_input(int64_t k, int64_t bits) { return bits == 8 ? k : (k < 32 ? 2 * k : 2 * (k - 32) + 1); }

inline Int8Rows int8_rows(const float* x, int64_t M, int64_t I, int64_t bits, int64_t G) {
  Int8Rows r{std::vector<int8_t>(M * I), std::vector<float>(M * I / BLOCK), std::vector<float>(M * G, 0.0f)};
  std::vector<int8_t> natural(I);
  const float offset = bits == 8 ? 128.0f : 8.0f;
  const int64_t gs = I / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < I / BLOCK; ++b) {
      const float s = quantize_block(x + m * I + BLOCK * b, natural.data() + BLOCK * b);
      r.sx[m * (I / BLOCK) + b] = s;
      for (int64_t i = BLOCK * b; i < BLOCK * (b + 1); ++i) r.offsets[m * G + i / gs] += offset * s * static_cast<float>(natural[i]);
    }
    int8_t* q = r.q.data() + m * I;
    for (int64_t c = 0; c < I; c += 64)
      for (int64_t k = 0; k < 64; ++k) q[c + k] = natural[c + chunk_input(k, bits)];
  }
  return r;
}

// A stored byte of a weight row as the lanes read it: byte k of chunk c, unsigned.
inline int32_t chunk_byte(const uint8_t* w, int64_t c, int64_t k, int64_t bits) {
  if (bits == 8) return w[64 * c + k];
  return k < 32 ? (w[32 * c + k] & 0xF) : (w[32 * c + k - 32] >> 4);
}

// The offsets' share of out[m, o]: sum over groups of the weight scale times offsets[m, g].
inline float offset_term(const float* offsets, const float* s, int64_t G) {
  float t = 0.0f;
  for (int64_t g = 0; g < G; ++g) t += s[g] * offsets[g];
  return t;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
inline __m512i int4_chunk(const uint8_t* w) {  // 32 bytes -> the 32 low nibbles, then the 32 high ones
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), low = _mm256_set1_epi8(0x0F);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low)),
                            _mm256_and_si256(_mm256_srli_epi16(b, 4), low), 1);
}

template <int BITS>
__attribute__((always_inline)) inline __m512i weight_chunk(const uint8_t* w, int64_t c) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(w + 64 * c);
  } else {
    return int4_chunk(w + 32 * c);
  }
}

// Chunk c's weight scales by lane (grouped): one group for the chunk, or two of 32 inputs (int8
// lanes 0-7 hold the chunk's first 32 inputs; int4 lanes 0-3 and 8-11, their even and odd inputs).
template <int BITS>
__attribute__((always_inline)) inline __m512 lane_scales(const float* s, int64_t gs, int64_t c) {
  if (gs >= 64) return _mm512_set1_ps(s[64 * c / gs]);
  const __m512i pair = BITS == 8 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                 : _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_castpd_ps(
      _mm_load_sd(reinterpret_cast<const double*>(s + 2 * c)))));
}

// out[m * O + r] for rows m0 .. m0 + MR of xr and NR weight rows w + r * ld with scales s + r * lds;
// ahead: the NR weight rows to prefetch meanwhile (nullptr: none). Software prefetch: the hardware's
// alone left the product at ~0.3 of the read bandwidth on weights cold in memory.
// Each (row of x, weight row) pair sums its blocks in order whatever the tile (batch invariance);
// NR weight rows side by side give independent chains to overlap.
template <int MR, int NR, int BITS, bool GROUPED>
inline void int8_activation_rows(const Int8Rows& xr, int64_t m0, int64_t I, int64_t G, const uint8_t* w, int64_t ld,
                                 const float* s, int64_t lds, float* out, int64_t O, const uint8_t* ahead) {
  const int64_t gs = I / G, blocks = I / BLOCK, per_block = BLOCK / 64;
  const int8_t* q = xr.q.data() + m0 * I;
  const float* sx = xr.sx.data() + m0 * blocks;
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i di[NR][MR];  // per channel: the block's int32 sums
    __m512 df[NR][MR];  // per group: the block's sums scaled by their weight scales
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) {
        di[r][m] = _mm512_setzero_si512();
        df[r][m] = _mm512_setzero_ps();
      }
    for (int64_t c = b * per_block; c < (b + 1) * per_block; ++c) {
      for (int r = 0; r < NR; ++r) {
        if (ahead != nullptr)  // the same bytes of the rows this tile's successor reads, into L2
          _mm_prefetch(reinterpret_cast<const char*>(ahead + r * ld + c * 64 * BITS / 8), _MM_HINT_T1);
        const __m512i wv = weight_chunk<BITS>(w + r * ld, c);
        if constexpr (GROUPED) {
          const __m512 sw = lane_scales<BITS>(s + r * lds, gs, c);
          for (int m = 0; m < MR; ++m) {
            const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(q + m * I + 64 * c));
            df[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sw, df[r][m]);
          }
        } else {
          for (int m = 0; m < MR; ++m) di[r][m] = _mm512_dpbusd_epi32(di[r][m], wv, _mm512_loadu_si512(q + m * I + 64 * c));
        }
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) {
        const __m512 block = GROUPED ? df[r][m] : _mm512_cvtepi32_ps(di[r][m]);
        acc[r][m] = _mm512_fmadd_ps(block, _mm512_set1_ps(sx[m * blocks + b]), acc[r][m]);
      }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      const float* sr = s + r * lds;
      const float v = _mm512_reduce_add_ps(acc[r][m]);
      out[m * O + r] = GROUPED ? v - offset_term(xr.offsets.data() + (m0 + m) * G, sr, G)
                               : sr[0] * (v - xr.offsets[(m0 + m) * G]);
    }
}

template <int MR, int NR, int BITS, bool GROUPED>
inline void int8_activation_tile(const Int8Rows& xr, int64_t m0, int64_t I, const Quantized& q, int64_t o, int64_t o1,
                                 float* out, int64_t O) {
  const uint8_t* ahead = m0 == 0 && o + PREFETCH_AHEAD + NR <= o1 ? q.w + (o + PREFETCH_AHEAD) * q.ld : nullptr;
  int8_activation_rows<MR, NR, BITS, GROUPED>(xr, m0, I, q.G, q.w + o * q.ld, q.ld, q.scale + o * q.lds, q.lds,
                                              out + m0 * O + o, O, ahead);
}

// Weight rows [o0, o1) against every row of x, four at a time: one row of x against four weight
// rows (a VPDPBUSD's latency is several of its issue intervals: four chains keep it busy), more rows
// of x against two weight rows.
template <int BITS, bool GROUPED>
inline void int8_activation_block(const Int8Rows& xr, int64_t M, int64_t I, const Quantized& q, int64_t o0, int64_t o1,
                                  float* out, int64_t O) {
  const int64_t row_bytes = I * BITS / 8;  // the first rows, which no tile prefetches, asked for at once
  for (int64_t o = o0; o < std::min(o1, o0 + PREFETCH_AHEAD); ++o)
    for (int64_t k = 0; k < row_bytes; k += 64) _mm_prefetch(reinterpret_cast<const char*>(q.w + o * q.ld + k), _MM_HINT_T1);
  if (M == 1) {
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) int8_activation_tile<1, 4, BITS, GROUPED>(xr, 0, I, q, o, o1, out, O);
    for (; o < o1; ++o) int8_activation_tile<1, 1, BITS, GROUPED>(xr, 0, I, q, o, o1, out, O);
    return;
  }
  for (int64_t o = o0; o < o1; o += 2) {
    const bool two = o + 1 < o1;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      switch (std::min<int64_t>(4, M - m0) * (two ? 1 : -1)) {
        case 4: int8_activation_tile<4, 2, BITS, GROUPED>(xr, m0, I, q, o, o1, out, O); break;
        case 3: int8_activation_tile<3, 2, BITS, GROUPED>(xr, m0, I, q, o, o1, out, O); break;
        case 2: int8_activation_tile<2, 2, BITS, GROUPED>(xr, m0, I, q, o, o1, out, O); break;
        case 1: int8_activation_tile<1, 2, BITS, GROUPED>(xr, m0, I, q, o, o1, out, O); break;
        case -4: int8_activation_tile<4, 1, BITS, GROUPED>(xr, m0, I, q, o, o1, out, O); break;
        case -3: int8_activation_tile<3, 1, BITS, GROUPED>(xr, m0, I, q, o, o1, out, O); break;
        case -2: int8_activation_tile<2, 1, BITS, GROUPED>(xr, m0, I, q, o, o1, out, O); break;
        default: int8_activation_tile<1, 1, BITS, GROUPED>(xr, m0, I, q, o, o1, out, O); break;
      }
    }
  }
}
#endif

// out (M, O) = the int8 activations of x times the quantized w.
inline void int8_activation_product(const float* x, const Quantized& q, int64_t M, int64_t I, int64_t O, float* out,
                                    int nt) {
  const Int8Rows xr = int8_rows(x, M, I, q.bits, q.G);
#pragma omp parallel num_threads(nt)
  {  // each thread a contiguous block of weight rows
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t o0 = O * t / nth, o1 = O * (t + 1) / nth;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    if (q.bits == 8) {
      q.G > 1 ? int8_activation_block<8, true>(xr, M, I, q, o0, o1, out, O)
              : int8_activation_block<8, false>(xr, M, I, q, o0, o1, out, O);
    } else {
      q.G > 1 ? int8_activation_block<4, true>(xr, M, I, q, o0, o1, out, O)
              : int8_activation_block<4, false>(xr, M, I, q, o0, o1, out, O);
    }
#else
    const int64_t gs = I / q.G;
    for (int64_t o = o0; o < o1; ++o) {  // the same sums, one product at a time
      const uint8_t* w = q.w + o * q.ld;
      const float* s = q.scale + o * q.lds;
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.0f;
        for (int64_t b = 0; b < I / BLOCK; ++b) {
          float block = 0.0f;
          for (int64_t c = b * BLOCK / 64; c < (b + 1) * BLOCK / 64; ++c)
            for (int64_t k = 0; k < 64; ++k)
              block += static_cast<float>(chunk_byte(w, c, k, q.bits) * xr.q[m * I + 64 * c + k]) *
                       s[(64 * c + chunk_input(k, q.bits)) / gs];
          acc += block * xr.sx[m * (I / BLOCK) + b];
        }
        out[m * O + o] = acc - offset_term(xr.offsets.data() + m * q.G, s, q.G);
      }
    }
#endif
  }
}

// out (M, O) = x (M, I) times the quantized w; threads split the O rows, each weight row is read once
// for every row of x (four at a time).
inline void quantized_product(const float* x, const Quantized& q, int64_t M, int64_t I, int64_t O, float* out) {
  if (M == 0 || O == 0) return;
  int nt = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(O)));
  if (O * I * q.bits / 8 < 96 * 1024) nt = 1;  // as gemv.h's ONE_THREAD_BYTES
  if (I % BLOCK == 0) {  // moegpt/quant/scheme.py: int8_activations
    int8_activation_product(x, q, M, I, O, out, nt);
    return;
  }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  std::vector<float> ordered;
  if (q.bits == 4) {
    ordered = int4_order(x, M, I);
    x = ordered.data();
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xm = x + m0 * I;
      float* om = out + m0 * O;
      switch (std::min<int64_t>(4, M - m0)) {
        case 4: quantized_row<4>(xm, I, q, o, om, O); break;
        case 3: quantized_row<3>(xm, I, q, o, om, O); break;
        case 2: quantized_row<2>(xm, I, q, o, om, O); break;
        default: quantized_row<1>(xm, I, q, o, om, O); break;
      }
    }
  }
#else
  const int64_t gs = I / q.G;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = 0; o < O; ++o) {
    const uint8_t* w = q.w + o * q.ld;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t g = 0; g < q.G; ++g) {
        float t = 0.0f;
        for (int64_t i = g * gs; i < (g + 1) * gs; ++i) t += x[m * I + i] * static_cast<float>(quantized_value(w, i, q.bits));
        acc += t * q.scale[o * q.lds + g];
      }
      out[m * O + o] = acc;
    }
  }
#endif
}

// Checks a quantized weight w (..., O, P) and its scale (..., O, G); returns I.
inline int64_t quantized_in_features(const at::Tensor& w, const at::Tensor& scale, int64_t bits, const char* op) {
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits ", bits, " (8 or 4)");
  TORCH_CHECK(w.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat && w.dim() >= 2 &&
              scale.dim() == w.dim() && w.stride(-1) == 1 && scale.is_contiguous() && w.device().is_cpu() &&
              scale.device().is_cpu(), op, ": a quantized weight is uint8 (..., O, P) with rows contiguous and an "
              "fp32 scale (..., O, G) on the CPU, got ", w.scalar_type(), " ", w.sizes(), " and ", scale.scalar_type(),
              " ", scale.sizes());
  const int64_t I = w.size(-1) * 8 / bits, G = scale.size(-1);
  TORCH_CHECK(scale.size(-2) == w.size(-2) && G >= 1 && I % G == 0 && (bits == 8 || (I / G) % 32 == 0), op,
              ": scale ", scale.sizes(), " does not match weight ", w.sizes(), " (", bits, "-bit groups of ",
              "whole inputs; int4 groups a multiple of 32)");
  return I;
}

}  // namespace moegpt
