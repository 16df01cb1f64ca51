// Quantized products over weights in tiles of 16 output rows (moegpt/quant/scheme.py: tile), with
// int8 activations (scheme.py: quantize_activations, blocks of BLOCK inputs):
//
//   out[m, o] = sum over spans p of scale(o, p) * sx(m, p) * sum_{i in p} q[o, i] * xq[m, i]
//
// A tile's 64 bytes hold 16 output rows' values for the same 4 inputs (int8), or 8 (int4: the first 4
// in the low nibbles), one row per int32 lane. One VPDPBUSD multiplies them by the same 4 activations
// broadcast to every lane: 64 products, summed into the 16 rows' own lanes, so no horizontal sum is
// ever needed and the activations are read as one broadcast per 4 inputs for all 16 rows. A span
// (a weight group, or an activation block per channel) sums in int32, starting from minus the stored
// offset (128 or 8) times its activations' sum, so its sum is exactly sum q * xq; it costs one
// convert and one or two multiply-adds per 16 rows. int4's high nibbles are masked where they are,
// 16 times their value and still a byte, summed in their own chain and shifted back once per span:
// one instruction fewer per 64 bytes than shifting each vector down.
//
// Legend: M rows of x, O out rows (a multiple of 16), I inputs (a multiple of BLOCK), G groups per row
// (1 per channel), T = O / 16 tiles.

#pragma once

#include <type_traits>

#include "qcommon.h"

namespace moegpt {

constexpr int64_t PREFETCH_TILES = 2;  // tiles ahead of the ones being multiplied
constexpr int64_t STREAM_ROWS = 4;  // up to this many rows of x: one tile after another (tiles_range)

struct TiledWeight {
  const uint8_t* w;  // (T, 16 * I * bits / 8) tiles, ldt bytes apart
  const float* scale;  // (T, G, 16), lds floats apart
  int64_t bits, G, ldt, lds;
};

struct TileRows {
  std::vector<int8_t> q;  // (M, I) xq in input order
  std::vector<float> sx;  // (M, I / BLOCK)
  std::vector<int32_t> init;  // (M, spans): minus the offset times the span's activations' sum
};

inline TileRows tile_rows(const float* x, int64_t M, int64_t I, int64_t bits, int64_t span) {
  TileRows r{std::vector<int8_t>(M * I), std::vector<float>(M * I / BLOCK), std::vector<int32_t>(M * I / span, 0)};
  const int32_t offset = bits == 8 ? 128 : 8;
  for (int64_t m = 0; m < M; ++m) {
    int8_t* q = r.q.data() + m * I;
    for (int64_t b = 0; b < I / BLOCK; ++b) r.sx[m * (I / BLOCK) + b] = quantize_block(x + m * I + BLOCK * b, q + BLOCK * b);
    for (int64_t p = 0; p < I / span; ++p) {
      int32_t sum = 0;
      for (int64_t i = p * span; i < (p + 1) * span; ++i) sum += q[i];
      r.init[m * (I / span) + p] = -offset * sum;
    }
  }
  return r;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// out[m * O + 16 t + j] for rows m0 .. m0 + MR of x and NT tiles from w (their scales from s);
// ahead: the NT tiles to prefetch meanwhile (nullptr: none).
template <int MR, int NT, int BITS, bool GROUPED>
inline void tile_block(const TileRows& xr, int64_t m0, int64_t I, int64_t G, const uint8_t* w, int64_t ldt,
                       const float* s, int64_t lds, float* out, int64_t O, const uint8_t* ahead) {
  const int64_t span = GROUPED ? I / G : BLOCK, spans = I / span, blocks = I / BLOCK;
  const int8_t* q = xr.q.data() + m0 * I;
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(static_cast<char>(0xF0));
  // too few chains to cover a VPDPBUSD's latency: twice as many per tile and row, alternate steps in each
  constexpr bool SPLIT = MR * NT < 8;
  __m512 acc[NT][MR];
  for (int t = 0; t < NT; ++t)
    for (int m = 0; m < MR; ++m) acc[t][m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < spans; ++p) {
    // int8: d1 the SPLIT steps; int4: d0/d1 the low / high nibbles' sums, d2/d3 theirs of the SPLIT steps
    __m512i d0[NT][MR], d1[NT][MR], d2[NT][MR], d3[NT][MR];
    for (int m = 0; m < MR; ++m) {
      const __m512i init = _mm512_set1_epi32(xr.init[(m0 + m) * spans + p]);
      for (int t = 0; t < NT; ++t) {
        d0[t][m] = init;
        d1[t][m] = d2[t][m] = d3[t][m] = _mm512_setzero_si512();
      }
    }
    const int64_t i0 = p * span, i1 = i0 + span;
    if constexpr (BITS == 8) {
      // 64 bytes of a tile per 4 inputs; SPLIT: two steps per iteration, the second into d1
      constexpr int STEPS = SPLIT ? 2 : 1;
      for (int64_t i = i0; i < i1; i += 4 * STEPS) {
        for (int step = 0; step < STEPS; ++step) {
          const int64_t j = i + 4 * step;
          __m512i wv[NT];
          for (int t = 0; t < NT; ++t) {
            if (ahead != nullptr && j % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(ahead + t * ldt + 16 * j), _MM_HINT_T1);
            wv[t] = _mm512_loadu_si512(w + t * ldt + 16 * j);
          }
          for (int m = 0; m < MR; ++m) {
            const __m512i xb = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(q + m * I + j));
            for (int t = 0; t < NT; ++t) {
              if (step == 0) {
                d0[t][m] = _mm512_dpbusd_epi32(d0[t][m], wv[t], xb);
              } else {
                d1[t][m] = _mm512_dpbusd_epi32(d1[t][m], wv[t], xb);
              }
            }
          }
        }
      }
    } else {
      // 64 bytes of a tile per 8 inputs; SPLIT: two steps per iteration, the second into d2/d3
      constexpr int STEPS = SPLIT ? 2 : 1;
      for (int64_t i = i0; i < i1; i += 8 * STEPS) {
        for (int step = 0; step < STEPS; ++step) {
          const int64_t j = i + 8 * step;
          __m512i lo[NT], hi[NT];
          for (int t = 0; t < NT; ++t) {
            if (ahead != nullptr) _mm_prefetch(reinterpret_cast<const char*>(ahead + t * ldt + 8 * j), _MM_HINT_T1);
            const __m512i v = _mm512_loadu_si512(w + t * ldt + 8 * j);
            lo[t] = _mm512_and_si512(v, low);
            hi[t] = _mm512_and_si512(v, high);  // 16 times the high nibbles, unshifted: summed 16x (see below)
          }
          for (int m = 0; m < MR; ++m) {
            const __m512i xl = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(q + m * I + j));
            const __m512i xh = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(q + m * I + j + 4));
            for (int t = 0; t < NT; ++t) {
              if (step == 0) {
                d0[t][m] = _mm512_dpbusd_epi32(d0[t][m], lo[t], xl);
                d1[t][m] = _mm512_dpbusd_epi32(d1[t][m], hi[t], xh);
              } else {
                d2[t][m] = _mm512_dpbusd_epi32(d2[t][m], lo[t], xl);
                d3[t][m] = _mm512_dpbusd_epi32(d3[t][m], hi[t], xh);
              }
            }
          }
        }
      }
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 sxm = _mm512_set1_ps(xr.sx[(m0 + m) * blocks + i0 / BLOCK]);
      for (int t = 0; t < NT; ++t) {
        // int4: d1 + d3 is 16 times the high nibbles' sum (a multiple of 16: the shift is exact)
        const __m512i d = BITS == 4 ? _mm512_add_epi32(_mm512_add_epi32(d0[t][m], d2[t][m]),
                                                       _mm512_srai_epi32(_mm512_add_epi32(d1[t][m], d3[t][m]), 4))
                                    : _mm512_add_epi32(d0[t][m], d1[t][m]);
        const __m512 f = _mm512_cvtepi32_ps(d);
        if constexpr (GROUPED) {
          acc[t][m] = _mm512_fmadd_ps(_mm512_mul_ps(f, _mm512_loadu_ps(s + t * lds + 16 * p)), sxm, acc[t][m]);
        } else {
          acc[t][m] = _mm512_fmadd_ps(f, sxm, acc[t][m]);
        }
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int m = 0; m < MR; ++m)
      _mm512_storeu_ps(out + m * O + 16 * t, GROUPED ? acc[t][m] : _mm512_mul_ps(acc[t][m], _mm512_loadu_ps(s + t * lds)));
}

// Tiles [t0, t1) against every row of x. Up to STREAM_ROWS rows, one tile after another without
// software prefetch: a tile's 16 rows are contiguous and so are consecutive tiles, so each thread
// reads one sequential stream, the hardware prefetcher's best case (the SPLIT chains keep VPDPBUSD
// busy). Measured on a 2-core Zen 4, 48 cold (2048, 768) matrices, fraction of a paired 1 GiB sum at
// ~45 GB/s, against four tiles at a time with prefetch: 1 row int8 0.82 vs 0.71, int4 0.69 vs 0.59;
// 2 rows 0.82 vs 0.68 and 0.66 vs 0.59; at ~30 GB/s, 3 rows 0.88 vs 0.82 and 0.74 vs 0.71, 4 rows
// 0.70 vs 0.73 and 0.81 vs 0.68. More rows are compute-bound: blocks of four rows against two tiles
// reuse each load (16 rows: 0.39 vs 0.33 one tile at a time).
template <int BITS, bool GROUPED>
inline void tiles_range(const TileRows& xr, int64_t M, int64_t I, const TiledWeight& q, int64_t t0, int64_t t1,
                        float* out, int64_t O) {
  const bool stream = M <= STREAM_ROWS;  // one tile at a time, no software prefetch
  auto run = [&](auto mr, auto nt, int64_t m0, int64_t t) {
    constexpr int MR = decltype(mr)::value, NT = decltype(nt)::value;
    const uint8_t* ahead = !stream && m0 == 0 && t + PREFETCH_TILES + NT <= t1 ? q.w + (t + PREFETCH_TILES) * q.ldt
                                                                                : nullptr;
    tile_block<MR, NT, BITS, GROUPED>(xr, m0, I, q.G, q.w + t * q.ldt, q.ldt, q.scale + t * q.lds, q.lds,
                                      out + m0 * O + 16 * t, O, ahead);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  using I4 = std::integral_constant<int, 4>;
  if (stream) {
    for (int64_t t = t0; t < t1; ++t) {
      switch (M) {
        case 4: run(I4{}, I1{}, 0, t); break;
        case 3: run(I3{}, I1{}, 0, t); break;
        case 2: run(I2{}, I1{}, 0, t); break;
        default: run(I1{}, I1{}, 0, t); break;
      }
    }
    return;
  }
  for (int64_t t = t0; t < t1; t += 2) {
    const bool two = t + 1 < t1;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      switch (std::min<int64_t>(4, M - m0)) {
        case 4: two ? run(I4{}, I2{}, m0, t) : run(I4{}, I1{}, m0, t); break;
        case 3: two ? run(I3{}, I2{}, m0, t) : run(I3{}, I1{}, m0, t); break;
        case 2: two ? run(I2{}, I2{}, m0, t) : run(I2{}, I1{}, m0, t); break;
        default: two ? run(I1{}, I2{}, m0, t) : run(I1{}, I1{}, m0, t); break;
      }
    }
  }
}
#endif

// The value of input i of row j of a tile (the scalar path).
inline int32_t tile_byte(const uint8_t* tile, int64_t i, int64_t j, int64_t bits) {
  if (bits == 8) return tile[16 * (i & ~int64_t{3}) + 4 * j + (i & 3)];
  const uint8_t b = tile[8 * (i & ~int64_t{7}) + 4 * j + (i & 3)];
  return (i & 4) ? b >> 4 : b & 0xF;
}

// One product of tiled_products: out (M, O) = the int8 activations of x (M, I) times the tiled weight q.
struct TiledJob {
  const float* x;
  TiledWeight q;
  int64_t M, I, O;
  float* out;
};

// Tiles [t0, t1) of job j against its rows (xr: its activations).
inline void job_tiles(const TiledJob& j, const TileRows& xr, int64_t t0, int64_t t1) {
  const TiledWeight& q = j.q;
  const int64_t M = j.M, I = j.I, O = j.O;
  float* out = j.out;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if (q.bits == 8) {
    q.G > 1 ? tiles_range<8, true>(xr, M, I, q, t0, t1, out, O) : tiles_range<8, false>(xr, M, I, q, t0, t1, out, O);
  } else {
    q.G > 1 ? tiles_range<4, true>(xr, M, I, q, t0, t1, out, O) : tiles_range<4, false>(xr, M, I, q, t0, t1, out, O);
  }
#else
  const int64_t span = q.G > 1 ? I / q.G : BLOCK, spans = I / span, blocks = I / BLOCK;
  for (int64_t t = t0; t < t1; ++t) {  // the same sums, one output at a time
    const uint8_t* tile = q.w + t * q.ldt;
    const float* s = q.scale + t * q.lds;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < 16; ++r) {
        float acc = 0.0f;
        for (int64_t p = 0; p < spans; ++p) {
          int32_t d = xr.init[m * spans + p];
          for (int64_t i = p * span; i < (p + 1) * span; ++i) d += tile_byte(tile, i, r, q.bits) * xr.q[m * I + i];
          const float f = static_cast<float>(d) * (q.G > 1 ? s[16 * p + r] : 1.0f);
          acc += f * xr.sx[m * blocks + p * span / BLOCK];
        }
        out[m * O + 16 * t + r] = q.G > 1 ? acc : acc * s[r];
      }
  }
#endif
}

// Several products in one parallel region (a step's chosen experts): the jobs' tiles, in order, split
// into one contiguous range per thread, so each thread streams its tiles one after another and the
// threads fork and join once (the experts of a batch-16 step are ~14 products of ~2 rows each). A
// tile weighs one unit per STREAM_ROWS rows of its job (more rows are compute-bound), and belongs
// to the thread whose range holds its first unit, so every tile is done once.
inline void tiled_products(const TiledJob* jobs, int64_t n) {
  std::vector<TileRows> rows;
  std::vector<int64_t> first(n + 1, 0), units(n, 0);  // each job's first unit in the joined order; per tile
  int64_t bytes = 0;
  rows.reserve(n);
  for (int64_t j = 0; j < n; ++j) {
    const TiledJob& job = jobs[j];
    const int64_t T = job.M > 0 ? job.O / 16 : 0;  // (a job without rows adds no tiles)
    rows.push_back(tile_rows(job.x, job.M, job.I, job.q.bits, job.q.G > 1 ? job.I / job.q.G : BLOCK));
    units[j] = (job.M + STREAM_ROWS - 1) / STREAM_ROWS;
    first[j + 1] = first[j] + T * units[j];
    bytes += T * 16 * job.I * job.q.bits / 8;
  }
  const int64_t total = first[n];
  if (total == 0) return;
  int nt = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(total)));
  if (bytes < 96 * 1024) nt = 1;  // as gemv.h's ONE_THREAD_BYTES
#pragma omp parallel num_threads(nt)
  {  // each thread a contiguous range [a, b) of the joined units
    const int th = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t a = total * th / nth, b = total * (th + 1) / nth;
    for (int64_t j = 0; j < n; ++j) {
      if (units[j] == 0) continue;
      const int64_t lo = std::max(a, first[j]) - first[j], hi = std::min(b, first[j + 1]) - first[j];
      if (lo >= hi) continue;
      const int64_t t0 = (lo + units[j] - 1) / units[j], t1 = (hi + units[j] - 1) / units[j];  // first units inside
      if (t0 < t1) job_tiles(jobs[j], rows[j], t0, t1);
    }
  }
}

// out (M, O) = the int8 activations of x (M, I) times the tiled weight.
inline void tiled_product(const float* x, const TiledWeight& q, int64_t M, int64_t I, int64_t O, float* out) {
  const TiledJob job{x, q, M, I, O, out};
  tiled_products(&job, 1);
}

// Checks a tiled weight w (..., T, 16 * P) and its scale (..., T, G, 16); returns I.
inline int64_t tiled_in_features(const at::Tensor& w, const at::Tensor& scale, int64_t bits, const char* op) {
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits ", bits, " (8 or 4)");
  TORCH_CHECK(w.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat && w.dim() >= 2 &&
              scale.dim() == w.dim() + 1 && w.stride(-1) == 1 && scale.is_contiguous() && w.device().is_cpu() &&
              scale.device().is_cpu() && w.size(-1) % 16 == 0, op, ": a tiled weight is uint8 (..., T, 16 * P) with ",
              "rows contiguous and an fp32 scale (..., T, G, 16) on the CPU, got ", w.sizes(), " and ", scale.sizes());
  const int64_t I = w.size(-1) / 16 * 8 / bits, G = scale.size(-2);
  TORCH_CHECK(scale.size(-1) == 16 && scale.size(-3) == w.size(-2) && G >= 1 && I % BLOCK == 0 && I % G == 0 &&
              (G == 1 || (BLOCK % (I / G) == 0 && (I / G) % 32 == 0)), op, ": scale ", scale.sizes(),
              " does not match tiled weight ", w.sizes(), " (inputs a multiple of ", BLOCK,
              ", groups of 32 to ", BLOCK, " inputs dividing ", BLOCK, ")");
  return I;
}

}  // namespace moegpt
