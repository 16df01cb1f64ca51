// Paged MQA/GQA attention for one decode step, as decode_layer.cpp's layer calls it: each sequence's
// query heads over its keys where they are in the paged cache (slot = block * block_size + offset,
// via its block table). The R = H / G query heads of a kv head are rows against that head's keys,
// each key read once. A sequence's keys are split in chunks of a fixed size (flash-decoding),
// combined in order, so a sequence's result does not depend on the batch. The cache is in the
// model's dtype, or 8-bit with a scale per slot and head (moegpt/infer/kv_quant.py).
//
// Legend: B sequences, H query heads, G kv heads, R = H / G, Dh head dim, nb blocks per table row.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gemv.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moegpt {  // the 8-bit KV cache's values (moegpt/infer/kv_quant.py), times their scale when read
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(c10::Float8_e4m3fn v) { return static_cast<float>(v); }
}  // namespace moegpt

namespace moegpt::attention_detail {

using moegpt::to_float;

constexpr int64_t CHUNK = 64;  // keys per attention work item

// exp for x <= 88.37 (Cephes' expf: range reduction by ln 2 and a degree-6 polynomial, ~2 ulp),
// written so that loops over arrays vectorise.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.37f);  // past ~88.38 the scale would be 2^128
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float r2 = r * r;
  const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                    1.6666665459e-1f) * r + 5.0000001201e-1f) * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX512F__)
// exp_approx on 16 lanes: the same reduction and polynomial, written with the same operations.
inline __m512 exp_approx(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.37f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#endif

struct Item {
  int64_t b, g, start, n;  // sequence, kv head, first key position, keys
};

constexpr int64_t HEADS = 16;  // query heads scored together: one vector of 16 fp32 lanes

#if defined(__AVX512F__)
// st[c * RP + r] = dot(q_r, k_c) for KB keys k (KB, Dh) and HEADS heads q (Dh, HEADS): KB
// independent sums, each over d in order, so a key's scores do not depend on KB.
template <int KB>
inline void score_keys(const float* q, const float* k, int64_t Dh, int64_t RP, float* st) {
  __m512 a[KB];
  for (int c = 0; c < KB; ++c) a[c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < Dh; ++d) {
    const __m512 qd = _mm512_loadu_ps(q + d * HEADS);
    for (int c = 0; c < KB; ++c) a[c] = _mm512_fmadd_ps(_mm512_set1_ps(k[c * Dh + d]), qd, a[c]);
  }
  for (int c = 0; c < KB; ++c) _mm512_storeu_ps(st + c * RP, a[c]);
}
#endif

// st[j * RP + r] = dot(q_r, k_j) for n keys kf (n, Dh) and the query heads transposed in blocks of
// HEADS, qt (RP / HEADS, Dh, HEADS): each key element is broadcast against HEADS heads at once, eight
// keys at a time (enough sums in flight to hide the FMA latency), so there is no horizontal sum per
// dot product.
inline void scores(const float* qt, const float* kf, int64_t n, int64_t Dh, int64_t RP, float* st) {
  for (int64_t rb = 0; rb < RP; rb += HEADS) {
    const float* q = qt + rb * Dh;  // (Dh, HEADS)
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 8 <= n; j += 8) score_keys<8>(q, kf + j * Dh, Dh, RP, st + j * RP + rb);
    for (; j + 4 <= n; j += 4) score_keys<4>(q, kf + j * Dh, Dh, RP, st + j * RP + rb);
#endif
    for (; j < n; ++j) {
      float a[HEADS] = {};
      for (int64_t d = 0; d < Dh; ++d) {
        const float kd = kf[j * Dh + d];
#pragma omp simd
        for (int64_t r = 0; r < HEADS; ++r) a[r] += kd * q[d * HEADS + r];
      }
      std::memcpy(st + j * RP + rb, a, sizeof(a));
    }
  }
}

// Over n keys' scores st (n, RP) of R heads: each head's maximum mx (R,), st replaced by
// exp(st - mx), and their sums sum (R,), each summed over the keys in order.
inline void softmax_numerators(float* st, int64_t n, int64_t RP, int64_t R, float* mx, float* sum) {
#if defined(__AVX512F__)
  for (int64_t rb = 0; rb < R; rb += HEADS) {  // 16 heads a vector (RP is a multiple of HEADS)
    __m512 hi = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) hi = _mm512_max_ps(hi, _mm512_loadu_ps(st + j * RP + rb));
    for (int64_t j = 0; j < n; ++j) {
      const __m512 e = exp_approx(_mm512_sub_ps(_mm512_loadu_ps(st + j * RP + rb), hi));
      _mm512_storeu_ps(st + j * RP + rb, e);
      total = _mm512_add_ps(total, e);
    }
    alignas(64) float h[HEADS], t[HEADS];
    _mm512_store_ps(h, hi);
    _mm512_store_ps(t, total);
    for (int64_t r = rb; r < std::min(R, rb + HEADS); ++r) {
      mx[r] = h[r - rb];
      sum[r] = t[r - rb];
    }
  }
#else
  for (int64_t r = 0; r < R; ++r) {
    mx[r] = -std::numeric_limits<float>::infinity();
    sum[r] = 0.0f;
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < R; ++r) mx[r] = std::max(mx[r], st[j * RP + r]);
  for (int64_t j = 0; j < n; ++j) {
    float* sj = st + j * RP;
    for (int64_t r = 0; r < R; ++r) {
      sj[r] = exp_approx(sj[r] - mx[r]);
      sum[r] += sj[r];
    }
  }
#endif
}

#if defined(__AVX512F__)
// NH heads' rows of a (R, Dh), dims [d0, d0 + 64): sums over the n keys in order of p[j, r] * v[j],
// 4 * NH sums in flight in registers.
template <int NH>
inline void weigh_values(const float* st, const float* vf, int64_t n, int64_t RP, int64_t Dh, int64_t r, int64_t d0,
                         float* a) {
  __m512 acc[NH][4];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* v = vf + j * Dh + d0;
    const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16), v2 = _mm512_loadu_ps(v + 32),
                 v3 = _mm512_loadu_ps(v + 48);
    for (int h = 0; h < NH; ++h) {
      const __m512 pj = _mm512_set1_ps(st[j * RP + r + h]);
      acc[h][0] = _mm512_fmadd_ps(pj, v0, acc[h][0]);
      acc[h][1] = _mm512_fmadd_ps(pj, v1, acc[h][1]);
      acc[h][2] = _mm512_fmadd_ps(pj, v2, acc[h][2]);
      acc[h][3] = _mm512_fmadd_ps(pj, v3, acc[h][3]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(a + (r + h) * Dh + d0 + 16 * c, acc[h][c]);
}
#endif

// a (R, Dh) = sum over the n keys, in order, of p[j, r] * v[j] (p = st (n, RP), v = vf (n, Dh)).
inline void weighted_values(const float* st, const float* vf, int64_t n, int64_t RP, int64_t R, int64_t Dh, float* a) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 64 <= Dh; d0 += 64) {  // 64 dims of two heads (or one) at a time
    int64_t r = 0;
    for (; r + 2 <= R; r += 2) weigh_values<2>(st, vf, n, RP, Dh, r, d0, a);
    if (r < R) weigh_values<1>(st, vf, n, RP, Dh, r, d0, a);
  }
#endif
  for (int64_t r = 0; r < R; ++r) {  // the dims left
    float* ar = a + r * Dh;
    std::fill(ar + d0, ar + Dh, 0.0f);
    for (int64_t j = 0; j < n && d0 < Dh; ++j) {
      const float pj = st[j * RP + r];
      const float* v = vf + j * Dh;
#pragma omp simd
      for (int64_t d = d0; d < Dh; ++d) ar[d] += pj * v[d];
    }
  }
}

// out (B, H * Dh) fp32: each sequence's query heads over its keys at positions [0, positions[b]].
template <typename KV>
void attention(const float* q, const KV* kc, const KV* vc, const float* ks, const float* vs, int64_t B, int64_t H,
               int64_t G, int64_t Dh,
               const int64_t* tables, int64_t nb, const int64_t* positions, int64_t block_size, float* out) {
  const int64_t R = H / G, RP = (R + HEADS - 1) / HEADS * HEADS;  // R padded to blocks of HEADS
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = positions[b] + 1;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t s = 0; s < L; s += CHUNK) items.push_back({b, g, s, std::min(CHUNK, L - s)});
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<float> m(n_items * R), l(n_items * R), acc(n_items * R * Dh);
#pragma omp parallel num_threads(std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(n_items))))
  {
    // this thread's chunk buffers, kept between calls (no allocation or zeroing per step)
    thread_local std::vector<float> kf, vf, st, qt;
    kf.resize(CHUNK * Dh);
    vf.resize(CHUNK * Dh);
    st.resize(CHUNK * RP);
    qt.resize(RP * Dh);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item w = items[it];
      const int64_t* table = tables + w.b * nb;
      for (int64_t j = 0; j < w.n;) {  // this chunk's keys and values from their slots, as fp32, a block at a time
        const int64_t p = w.start + j, first = table[p / block_size] * block_size + p % block_size;
        const int64_t run = std::min(block_size - p % block_size, w.n - j);  // consecutive slots in this block
        for (int64_t c = 0; c < run; ++c, ++j) {
          const int64_t slot = first + c;
          const KV* kr = kc + (slot * G + w.g) * Dh;
          const KV* vr = vc + (slot * G + w.g) * Dh;
          float* kd = kf.data() + j * Dh;
          float* vd = vf.data() + j * Dh;
          if (ks != nullptr) {  // an 8-bit cache: each slot and head's values times its scale
            const float a = ks[slot * G + w.g], e = vs[slot * G + w.g];
#pragma omp simd
            for (int64_t d = 0; d < Dh; ++d) {
              kd[d] = to_float(kr[d]) * a;
              vd[d] = to_float(vr[d]) * e;
            }
          } else {
#pragma omp simd
            for (int64_t d = 0; d < Dh; ++d) {
              kd[d] = to_float(kr[d]);
              vd[d] = to_float(vr[d]);
            }
          }
        }
      }
      const float* qb = q + (w.b * H + w.g * R) * Dh;  // (R, Dh): this kv head's query heads
      std::fill(qt.begin(), qt.end(), 0.0f);  // (padding heads score 0)
      for (int64_t r = 0; r < R; ++r)  // transposed, in blocks of HEADS heads: qt[(r / HEADS, d, r % HEADS)]
        for (int64_t d = 0; d < Dh; ++d) qt[((r / HEADS) * Dh + d) * HEADS + r % HEADS] = qb[r * Dh + d] * scale;
      scores(qt.data(), kf.data(), w.n, Dh, RP, st.data());  // st (n, RP): key j's scores for every head
      softmax_numerators(st.data(), w.n, RP, R, m.data() + it * R, l.data() + it * R);
      weighted_values(st.data(), vf.data(), w.n, RP, R, Dh, acc.data() + it * R * Dh);
    }
  }
  // each (sequence, kv head)'s chunks combined in order
  for (int64_t first = 0; first < n_items;) {
    int64_t last = first;
    while (last < n_items && items[last].b == items[first].b && items[last].g == items[first].g) ++last;
    const Item w = items[first];
    for (int64_t r = 0; r < R; ++r) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t it = first; it < last; ++it) mx = std::max(mx, m[it * R + r]);
      float* o = out + (w.b * H + w.g * R + r) * Dh;
      std::fill(o, o + Dh, 0.0f);
      float total = 0.0f;
      for (int64_t it = first; it < last; ++it) {
        const float c = std::exp(m[it * R + r] - mx);
        total += l[it * R + r] * c;
        const float* a = acc.data() + (it * R + r) * Dh;
        for (int64_t d = 0; d < Dh; ++d) o[d] += a[d] * c;
      }
      for (int64_t d = 0; d < Dh; ++d) o[d] /= total;
    }
    first = last;
  }
}

// One slot's keys (or values) of every kv head into an 8-bit cache, as moegpt/infer/kv_quant.py's
// quantize_kv: per head, scale = max |x| / largest (1 for an all-zero head), values = x / scale
// (int8: rounded to nearest even, clamped to +-127; fp8 e4m3: converted).
template <typename KV>
void write_8bit(const float* x, KV* values, float* scales, int64_t slot, int64_t G, int64_t Dh) {
  constexpr float largest = std::is_same_v<KV, int8_t> ? 127.0f : 448.0f;
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + g * Dh;
    float amax = 0.0f;
    for (int64_t d = 0; d < Dh; ++d) amax = std::max(amax, std::fabs(xg[d]));
    float s = amax / largest;
    if (!(s > 0.0f)) s = 1.0f;
    scales[slot * G + g] = s;
    KV* out = values + (slot * G + g) * Dh;
    for (int64_t d = 0; d < Dh; ++d) {
      if constexpr (std::is_same_v<KV, int8_t>) {
        out[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(xg[d] / s))));
      } else {
        out[d] = static_cast<KV>(xg[d] / s);
      }
    }
  }
}

// The new keys and values into their slots, then attention over each sequence's keys.
template <typename T, typename KV>
void write_and_attend(const float* qkv, int64_t Q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale, int64_t B,
                      int64_t H, int64_t G, int64_t Dh, const int64_t* tables, int64_t nb, const int64_t* pos,
                      int64_t block_size, const float* q, float* o) {
  KV* kc = k_cache.data_ptr<KV>();
  KV* vc = v_cache.data_ptr<KV>();
  float* ks = k_scale.has_value() ? k_scale->data_ptr<float>() : nullptr;
  float* vs = v_scale.has_value() ? v_scale->data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const float* row = qkv + b * Q;
    const int64_t slot = tables[b * nb + pos[b] / block_size] * block_size + pos[b] % block_size;
    if (ks != nullptr) {
      write_8bit<KV>(row + H * Dh, kc, ks, slot, G, Dh);
      write_8bit<KV>(row + (H + G) * Dh, vc, vs, slot, G, Dh);
    } else {
      for (int64_t i = 0; i < G * Dh; ++i) {
        kc[slot * G * Dh + i] = static_cast<KV>(row[H * Dh + i]);
        vc[slot * G * Dh + i] = static_cast<KV>(row[(H + G) * Dh + i]);
      }
    }
  }
  attention<KV>(q, kc, vc, ks, vs, B, H, G, Dh, tables, nb, pos, block_size, o);
}

}  // namespace moegpt::attention_detail
