// Quantized products with int8 activations over row-packed weights (moegpt/quant/scheme.py), for
// weights the decode program does not lay out in tiles (qtiles.h, faster: an output count that is
// not a multiple of 16). The reference is scheme.py: quantized_matmul.
//
// x quantized per row in blocks of BLOCK inputs, as llama.cpp's q8 activations (moegpt/quant/
// scheme.py: quantize_activations): sx = max |x| / 127, xq = round(x / sx). A 64-input chunk of a
// weight row is 64 unsigned bytes (int4: the 32 low nibbles, the even inputs, then the 32 high ones,
// the odd inputs) and xq is laid out in the same order, so one VPDPBUSD takes 64 products into 16
// int32 lanes. Per channel, a block's chunks accumulate in int32 and the block costs one convert and
// one FMA; per group, each chunk's lanes are scaled by their groups' weight scales. The stored
// offset (128 or 8) adds offset * sum(xq) to every product, a term that depends on the activations
// only: it is summed once per row of x and group (offsets below) and taken off at the end.

#pragma once

#include "qcommon.h"

namespace moegpt {

constexpr int64_t PREFETCH_AHEAD = 16;  // weight rows ahead of the tile being multiplied

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

}  // namespace moegpt
