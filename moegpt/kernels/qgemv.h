// Matrix-vector products with quantized weights in rows (moegpt/quant/scheme.py), for the few rows
// of a decode step: x (M, I) fp32 times w (O, I) stored as bytes (qcommon.h), -> (M, O) fp32:
//
//   out[m, o] = sum_g scale[o, g] * sum_{i in group g} x[m, i] * q[o, i]
//
// ``quantized_product`` takes the int8-activation path (qrows.h) where I is a multiple of BLOCK;
// here are the products with fp32 activations (bf16 values for a bf16 model) for other shapes, which
// differ from x @ dequantize(w).T only by fp32 rounding (scheme.py: quantized_matmul).
//
// Each weight row is widened 16 values at a time (int8: flip the offset bit, sign-extend, convert;
// int4: split the nibbles, subtract 8, convert) and multiplied into four (int8) or two (int4)
// accumulator chains per row of x; a group's sum is scaled once. Every output is summed in the
// same order whatever the number of rows, so a row of x gets bitwise the same result alone or beside
// others (batch invariance). For int4, x is first rearranged in blocks of 32 (the 16 even-indexed
// inputs, then the 16 odd ones) to match the nibbles.

#pragma once

#include "qcommon.h"
#include "qrows.h"

namespace moegpt {

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

}  // namespace moegpt
