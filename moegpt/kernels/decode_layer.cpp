// decode_layer: one whole decoder layer for a decode step (one new token per sequence), as one op:
//
//   h = rms_norm(x) -> q|k|v = h Wqkv -> rope(q, k) -> k, v into their cache slots
//   -> attention of each sequence's query heads over its paged keys -> x += o Wo
//   -> h = rms_norm(x) -> router -> softmax, top-k, renormalised -> the chosen experts' gate|up and
//   down products -> x += the routing-weighted sum
//
// x (B, D) in the model's dtype (fp32 or bf16); the weights are the decode program's views
// (moegpt/infer/decode.py: LayerWeights). The pure-PyTorch decode program computes the same layer in
// ~60 dispatched ops and is this op's oracle (tests/kernels/test_decode_layer.py); this op is one
// dispatch, so a decode step costs the weights' read and little else.
//
// Quantized weights (moegpt/quant): wqkv, wo and the experts' matrices may be stored as bytes with
// fp32 scales (w uint8, its scale given), multiplied by qgemv.h's products at any row count.
//
// Numerics follow the PyTorch program: values are rounded to the model's dtype where its ops round
// (after each norm, product, rope and residual add), accumulations are fp32, the router's softmax
// and routing weights are fp32.
//
// Attention (paged_attention.h) reads the keys and values where they are in the paged cache, in the
// model's dtype or 8-bit with scales.
//
// Legend: B sequences, D d_model, H query heads, G kv heads, R = H / G, Dh head dim, E experts,
// K top-k, F d_ff, nb blocks per table row.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "gemv.h"
#include "qgemv.h"
#include "paged_attention.h"
#include "qtiles.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif


namespace {

using moegpt::to_float;
using moegpt::attention_detail::exp_approx;
using moegpt::attention_detail::write_and_attend;


template <typename T>
inline float round_to(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return static_cast<float>(static_cast<T>(v));
  }
}

// a * b rounded to fp32 on its own, as PyTorch's separate multiply and add round it: the compiler may
// not fuse it into the addition that follows (one fused multiply-add rounds once, and -march=native
// lets GCC contract where it likes; it did on one x86 CPU and not another).
inline float separate_product(float a, float b) {
  float p = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(p));  // p must exist, rounded, in a register before it is added
#else
  volatile float kept = p;
  p = kept;
#endif
  return p;
}


#if defined(__AVX512F__)
// round_to on 16 lanes: bf16's round to nearest even (NaN to its quiet NaN), as c10::BFloat16's
// conversion rounds; fp32 unchanged.
template <typename T>
inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                          _mm512_set1_epi32(0x7FFF));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(bits, bias), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                                     _mm512_set1_epi32(0x7FC00000)));
  }
}

// 16 values of a table in T, as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

// x[i] = round_to<T>(x[i]) for n values.
template <typename T>
void round_all(float* x, int64_t n) {
  if constexpr (std::is_same_v<T, float>) return;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, round_to<T>(_mm512_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = round_to<T>(x[i]);
}

struct Limits {
  int64_t in_by_out, out_by_in;  // rows up to which the gemv kernel runs (past them: the library's mm)
};

// A matrix of the layer: w as nn.Linear stores it (O, I), or a stack (E, O, I); quantized: w (O, P)
// or (E, O, P) bytes and its scale (O, G) or (E, O, G) fp32.
struct Weight {
  const at::Tensor& w;
  const c10::optional<at::Tensor>& scale;
  int64_t bits;
  bool quantized() const { return scale.has_value(); }
  bool tiled() const { return quantized() && scale->dim() == w.dim() + 1; }  // moegpt/quant/scheme.py: tile
  int64_t in_features() const {
    return tiled() ? w.size(-1) / 16 * 8 / bits : quantized() ? w.size(-1) * 8 / bits : w.size(-1);
  }
  int64_t out_features() const { return tiled() ? w.size(-2) * 16 : w.size(-2); }
};

// out (M, O) fp32 = x (M, I) fp32 (values of the model's dtype) times one matrix on the gemv or the
// quantized kernel: w itself, or matrix e of a stack.
void kernel_product(const float* x, int64_t M, const Weight& wt, int64_t e, float* out) {
  const at::Tensor& w = wt.w;
  const int64_t d = w.dim(), O = w.size(d - 2), I = wt.in_features(), so = w.stride(d - 2), si = w.stride(d - 1);
  const int64_t offset = d == 3 ? e * w.stride(0) : 0;
  if (wt.tiled()) {
    const at::Tensor& s = *wt.scale;
    const moegpt::TiledWeight q{w.data_ptr<uint8_t>() + offset, s.data_ptr<float>() + (d == 3 ? e * s.stride(0) : 0),
                                wt.bits, s.size(-2), w.stride(d - 2), s.stride(d - 2)};
    moegpt::tiled_product(x, q, M, I, wt.out_features(), out);
    return;
  }
  if (wt.quantized()) {
    const at::Tensor& s = *wt.scale;
    const moegpt::Quantized q{w.data_ptr<uint8_t>() + offset, s.data_ptr<float>() + (d == 3 ? e * s.stride(0) : 0),
                              wt.bits, s.size(-1), so, s.stride(d - 2)};
    moegpt::quantized_product(x, q, M, I, O, out);
    return;
  }
  AT_DISPATCH_SWITCH(w.scalar_type(), "moegpt_decode_layer_product",
    AT_DISPATCH_CASE(at::kFloat, [&] { moegpt::product(x, w.data_ptr<float>() + offset, M, I, O, so, si, out); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      moegpt::product(x, w.data_ptr<c10::BFloat16>() + offset, M, I, O, so, si, out, /*x_is_bf16=*/true);
    }));
}

// An expert's rows among a step's assignments sorted by expert: [start, start + rows), of expert e.
struct ExpertRows {
  int64_t start, rows, e;
};

// The full-precision case of expert_products: a stack w (E, O, I) of T stored (out, in).
template <typename T>
void stacked_products(const float* x, const std::vector<ExpertRows>& groups, const at::Tensor& w, float* out) {
  const int64_t O = w.size(1), I = w.size(2);
  std::vector<moegpt::OutByIn<T>> jobs;
  for (const ExpertRows& g : groups)
    jobs.push_back({x + g.start * I, w.data_ptr<T>() + g.e * w.stride(0), g.rows, I, O, w.stride(1), out + g.start * O});
  moegpt::gemv_out_by_in_many(jobs.data(), static_cast<int64_t>(jobs.size()), /*x_is_bf16=*/true);
}

// out (A, O) = each group's rows of x (A, I) times its expert's matrix of the stack wt (E, O, I): as
// kernel_product does them one at a time, but full-precision stacks stored (out, in) and quantized
// ones in tiles each in one parallel region (moegpt::gemv_out_by_in_many, moegpt::tiled_products),
// the same numbers.
void expert_products(const float* x, const std::vector<ExpertRows>& groups, const Weight& wt, float* out) {
  const at::Tensor& w = wt.w;
  if (wt.tiled()) {  // quantized in tiles: every chosen expert in one parallel region (moegpt::tiled_products)
    const at::Tensor& s = *wt.scale;
    const int64_t I = wt.in_features(), O = wt.out_features();
    std::vector<moegpt::TiledJob> jobs;
    for (const ExpertRows& g : groups)
      jobs.push_back({x + g.start * I,
                      moegpt::TiledWeight{w.data_ptr<uint8_t>() + g.e * w.stride(0), s.data_ptr<float>() + g.e * s.stride(0),
                                          wt.bits, s.size(-2), w.stride(1), s.stride(1)},
                      g.rows, I, O, out + g.start * O});
    moegpt::tiled_products(jobs.data(), static_cast<int64_t>(jobs.size()));
  } else if (wt.quantized() || w.stride(2) != 1 || (w.stride(1) == 1 && w.size(1) > 1)) {
    const int64_t I = wt.in_features(), O = wt.out_features();
    for (const ExpertRows& g : groups) kernel_product(x + g.start * I, g.rows, wt, g.e, out + g.start * O);
  } else if (w.scalar_type() == at::kFloat) {
    stacked_products<float>(x, groups, w, out);
  } else {  // bf16 (the layer's checks allow no other dtype)
    stacked_products<c10::BFloat16>(x, groups, w, out);
  }
}

// out (M, O) fp32 = x (M, I) fp32 times w (O, I) as nn.Linear stores it: the gemv kernel for a few
// rows, the library's matmul in w's dtype for more (as the PyTorch program does).
void matmul(const float* x, int64_t M, const Weight& wt, float* out, Limits lim) {
  const at::Tensor& w = wt.w;
  const int64_t O = w.size(0), I = w.size(1), so = w.stride(0), si = w.stride(1);
  const int64_t limit = (so == 1 && O > 1) ? lim.in_by_out : (si == 1 ? lim.out_by_in : 0);
  if (M <= limit || wt.quantized()) {
    kernel_product(x, M, wt, 0, out);
    return;
  }
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {M, I}, at::kFloat).to(w.scalar_type());
  const at::Tensor y = at::mm(xt, w.t()).to(at::kFloat).contiguous();  // (M, O)
  std::memcpy(out, y.data_ptr<float>(), M * O * sizeof(float));
}

template <typename T>
void rms_norm(const T* x, const T* weight, int64_t B, int64_t D, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const T* xb = x + b * D;
    float ss = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = to_float(xb[d]);
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) out[b * D + d] = round_to<T>(to_float(weight[d]) * round_to<T>(to_float(xb[d]) * inv));
  }
}

// In place on n heads (n, Dh) of one row: x*cos + roll(x, Dh/2)*signed_sin, the sine negated on
// the first half (decode.py: rope).
template <typename T>
void rope(float* x, int64_t n, int64_t Dh, const T* cos, const T* sin) {
  const int64_t half = Dh / 2;
  for (int64_t h = 0; h < n; ++h) {
    float* xh = x + h * Dh;
    int64_t d = 0;
#if defined(__AVX512F__)
    if (half % 16 == 0) {
      for (; d < half; d += 16) {  // both halves at once: each reads the other's old values
        const __m512 x1 = _mm512_loadu_ps(xh + d), x2 = _mm512_loadu_ps(xh + half + d);
        const __m512 a1 = round_to<T>(_mm512_mul_ps(x1, load16(cos + d)));
        const __m512 b1 = round_to<T>(_mm512_mul_ps(x2, load16(sin + d)));
        const __m512 a2 = round_to<T>(_mm512_mul_ps(x2, load16(cos + half + d)));
        const __m512 b2 = round_to<T>(_mm512_mul_ps(x1, load16(sin + half + d)));
        _mm512_storeu_ps(xh + d, round_to<T>(_mm512_add_ps(a1, b1)));
        _mm512_storeu_ps(xh + half + d, round_to<T>(_mm512_add_ps(a2, b2)));
      }
      continue;
    }
#endif
    for (; d < half; ++d) {
      const float x1 = xh[d], x2 = xh[half + d];
      xh[d] = round_to<T>(round_to<T>(x1 * to_float(cos[d])) + round_to<T>(x2 * to_float(sin[d])));
      xh[half + d] = round_to<T>(round_to<T>(x2 * to_float(cos[half + d])) + round_to<T>(x1 * to_float(sin[half + d])));
    }
  }
}


inline float silu(float v) { return v / (1.0f + exp_approx(-v)); }

inline float gelu_tanh(float v) {
  const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
  return 0.5f * v * (1.0f + (1.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f)));
}

// The expert's activation of one row: a (Fd,) = silu(gate) * up of u = gate|up (2 Fd,), or
// gelu(up) of u = up (Fd,), rounded to T where the PyTorch program's ops round.
template <typename T>
void activate(const float* u, int64_t Fd, bool swiglu, float* a) {
  int64_t f = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  for (; f + 16 <= Fd; f += 16) {
    const __m512 v = round_to<T>(_mm512_loadu_ps(u + f));
    if (swiglu) {
      const __m512 s = _mm512_div_ps(v, _mm512_add_ps(one, exp_approx(_mm512_sub_ps(_mm512_setzero_ps(), v))));
      _mm512_storeu_ps(a + f, round_to<T>(_mm512_mul_ps(round_to<T>(s), round_to<T>(_mm512_loadu_ps(u + Fd + f)))));
    } else {
      const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), v), v);
      const __m512 w = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_add_ps(v, cube));
      const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(exp_approx(_mm512_mul_ps(two, w)), one)));
      _mm512_storeu_ps(a + f, round_to<T>(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(one, t))));
    }
  }
#endif
  for (; f < Fd; ++f)
    a[f] = swiglu ? round_to<T>(round_to<T>(silu(round_to<T>(u[f]))) * round_to<T>(u[Fd + f]))
                  : round_to<T>(gelu_tanh(round_to<T>(u[f])));
}

// The MoE (or a dense layer's one expert, router undefined) of h (B, D) -> y (B, D) fp32, rounded
// to T as the PyTorch program's sum of routed rows is. ``first_expert``: w_in / w_down hold experts
// [first_expert, first_expert + El) of the router's E (an expert-parallel rank's); the rows routed
// to the others add zero, so y is this rank's partial sum.
template <typename T>
void moe(const float* h, int64_t B, int64_t D, const c10::optional<at::Tensor>& router, const Weight& w_in,
         const Weight& w_down, int64_t top_k, bool swiglu, int64_t* counts, Limits lim, float* y,
         int64_t first_expert) {
  const int64_t El = w_in.w.size(0), E = router.has_value() ? router->size(0) : El;
  const int64_t Fin = w_in.out_features(), Fd = swiglu ? Fin / 2 : Fin;
  const bool routed = router.has_value();
  const int64_t K = routed ? top_k : 1;
  std::vector<int64_t> expert(B * K, 0);
  std::vector<float> weight(B * K, 1.0f);
  if (routed) {
    std::vector<float> logits(B * E);
    const c10::optional<at::Tensor> none;
    matmul(h, B, Weight{*router, none, 0}, logits.data(), lim);
    for (int64_t b = 0; b < B; ++b) {
      float* lb = logits.data() + b * E;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, lb[e] = round_to<T>(lb[e]));
      float sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) sum += (lb[e] = std::exp(lb[e] - mx));
      for (int64_t e = 0; e < E; ++e) lb[e] /= sum;
      float chosen = 0.0f;
      for (int64_t k = 0; k < K; ++k) {  // the k-th largest probability, the lowest index on ties
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
          bool taken = false;
          for (int64_t j = 0; j < k; ++j) taken |= expert[b * K + j] == e;
          if (!taken && (best < 0 || lb[e] > lb[best])) best = e;
        }
        expert[b * K + k] = best;
        weight[b * K + k] = lb[best];
        chosen += lb[best];
      }
      for (int64_t k = 0; k < K; ++k) weight[b * K + k] /= chosen;
    }
    if (counts != nullptr)
      for (int64_t a = 0; a < B * K; ++a) ++counts[expert[a]];
  }
  // the assignments grouped by expert: each chosen expert's matrices read once, the others never
  std::vector<int64_t> order(B * K);
  for (int64_t a = 0; a < B * K; ++a) order[a] = a;
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return expert[p] < expert[q]; });
  std::vector<ExpertRows> groups;  // this rank's chosen experts, their rows among the sorted assignments
  for (int64_t start = 0, end = 0; start < B * K; start = end) {
    while (end < B * K && expert[order[end]] == expert[order[start]]) ++end;
    const int64_t e = expert[order[start]] - first_expert;
    if (0 <= e && e < El) groups.push_back({start, end - start, e});  // (another rank's expert: its rows stay zero)
  }
  std::vector<float> xs(B * K * D), up(B * K * Fin), act(B * K * Fd), down(B * K * D), out(B * K * D, 0.0f);
  for (const ExpertRows& g : groups)
    for (int64_t r = g.start; r < g.start + g.rows; ++r) std::memcpy(&xs[r * D], h + (order[r] / K) * D, D * sizeof(float));
  expert_products(xs.data(), groups, w_in, up.data());  // (rows, Fin)
  for (const ExpertRows& g : groups)
    for (int64_t r = g.start; r < g.start + g.rows; ++r) activate<T>(&up[r * Fin], Fd, swiglu, &act[r * Fd]);
  expert_products(act.data(), groups, w_down, down.data());  // (rows, D)
  for (const ExpertRows& g : groups)
    for (int64_t r = g.start; r < g.start + g.rows; ++r) std::memcpy(&out[order[r] * D], &down[r * D], D * sizeof(float));
  for (int64_t b = 0; b < B; ++b) {  // each token's K rows, weighted in fp32, summed in order
    for (int64_t d = 0; d < D; ++d) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += round_to<T>(separate_product(round_to<T>(out[(b * K + k) * D + d]), weight[b * K + k]));
      y[b * D + d] = round_to<T>(s);
    }
  }
}


// decode_layer's ``part``: the whole layer (x and both residual additions), or one half's output alone
// (a tensor-parallel rank's partial sum, which the caller sums over ranks and adds to x).
constexpr int64_t kWholeLayer = 0, kAttentionPart = 1, kFfnPart = 2;

template <typename T>
at::Tensor layer(const at::Tensor& x, const at::Tensor& attn_norm, const Weight& wqkv, const Weight& wo,
                 const at::Tensor& ffn_norm, const c10::optional<at::Tensor>& router, const Weight& w_in,
                 const Weight& w_down, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rope_cos,
                 const at::Tensor& rope_sin, const at::Tensor& positions, const at::Tensor& block_tables,
                 int64_t block_size, int64_t n_heads, int64_t top_k, bool swiglu, double eps, int64_t* counts,
                 Limits lim, const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                 int64_t part, int64_t first_expert) {
  const int64_t B = x.size(0), D = x.size(1), G = k_cache.size(1), Dh = k_cache.size(2), H = n_heads;
  const int64_t Q = (H + 2 * G) * Dh, nb = block_tables.size(1);
  const T* xp = x.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t max_pos = rope_cos.size(0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= pos[b] && pos[b] < max_pos && pos[b] / block_size < nb, "moegpt::decode_layer: position ",
                pos[b], " of sequence ", b, " is outside its rope table (", max_pos, ") or block table (", nb, " blocks)");
    const int64_t slots = k_cache.size(0);
    for (int64_t i = 0; i <= pos[b] / block_size; ++i)  // (compared by division: no overflow)
      TORCH_CHECK(0 <= tables[b * nb + i] && tables[b * nb + i] < slots / block_size,
                  "moegpt::decode_layer: block ", tables[b * nb + i], " of sequence ", b, " is outside the cache");
  }
  std::vector<float> h(B * D), qkv(B * Q), o(B * H * Dh), y(B * D);
  at::Tensor out = at::empty_like(x);  // the residual stream after the layer (or the part's output)
  T* op = out.data_ptr<T>();
  if (part == kFfnPart) {  // the FFN's output of x alone
    rms_norm<T>(xp, ffn_norm.data_ptr<T>(), B, D, static_cast<float>(eps), h.data());
    moe<T>(h.data(), B, D, router, w_in, w_down, top_k, swiglu, counts, lim, y.data(), first_expert);
    for (int64_t i = 0; i < B * D; ++i) op[i] = static_cast<T>(y[i]);
    return out;
  }
  rms_norm<T>(xp, attn_norm.data_ptr<T>(), B, D, static_cast<float>(eps), h.data());
  matmul(h.data(), B, wqkv, qkv.data(), lim);
  round_all<T>(qkv.data(), B * Q);
  const T* cos = rope_cos.data_ptr<T>();
  const T* sin = rope_sin.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    rope<T>(qkv.data() + b * Q, H + G, Dh, cos + pos[b] * Dh, sin + pos[b] * Dh);  // q and k
  std::vector<float> q(B * H * Dh);
  for (int64_t b = 0; b < B; ++b) std::memcpy(&q[b * H * Dh], &qkv[b * Q], H * Dh * sizeof(float));
  switch (k_cache.scalar_type()) {
    case at::kChar:
      write_and_attend<T, int8_t>(qkv.data(), Q, k_cache, v_cache, k_scale, v_scale, B, H, G, Dh, tables, nb, pos,
                                  block_size, q.data(), o.data());
      break;
    case at::kFloat8_e4m3fn:
      write_and_attend<T, c10::Float8_e4m3fn>(qkv.data(), Q, k_cache, v_cache, k_scale, v_scale, B, H, G, Dh, tables,
                                              nb, pos, block_size, q.data(), o.data());
      break;
    default:
      write_and_attend<T, T>(qkv.data(), Q, k_cache, v_cache, k_scale, v_scale, B, H, G, Dh, tables, nb, pos,
                             block_size, q.data(), o.data());
  }
  round_all<T>(o.data(), B * H * Dh);
  matmul(o.data(), B, wo, y.data(), lim);
  if (part == kAttentionPart) {  // attention's output alone (its keys and values written)
    for (int64_t i = 0; i < B * D; ++i) op[i] = static_cast<T>(y[i]);
    return out;
  }
  for (int64_t i = 0; i < B * D; ++i) op[i] = static_cast<T>(to_float(xp[i]) + round_to<T>(y[i]));
  rms_norm<T>(op, ffn_norm.data_ptr<T>(), B, D, static_cast<float>(eps), h.data());
  moe<T>(h.data(), B, D, router, w_in, w_down, top_k, swiglu, counts, lim, y.data(), first_expert);
  for (int64_t i = 0; i < B * D; ++i) op[i] = static_cast<T>(to_float(op[i]) + y[i]);
  return out;
}

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& wqkv_, const at::Tensor& wo_,
                        const at::Tensor& ffn_norm, const c10::optional<at::Tensor>& router, const at::Tensor& w_in_,
                        const at::Tensor& w_down_, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rope_cos,
                        const at::Tensor& rope_sin, const at::Tensor& positions, const at::Tensor& block_tables,
                        int64_t block_size, int64_t n_heads, int64_t top_k, bool swiglu, double eps,
                        const c10::optional<at::Tensor>& counts, int64_t counts_row, int64_t max_rows_in_by_out,
                        int64_t max_rows_out_by_in, const c10::optional<at::Tensor>& wqkv_scale,
                        const c10::optional<at::Tensor>& wo_scale, const c10::optional<at::Tensor>& w_in_scale,
                        const c10::optional<at::Tensor>& w_down_scale, int64_t bits,
                        const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                        int64_t part, int64_t first_expert) {
  TORCH_CHECK(part == kWholeLayer || part == kAttentionPart || part == kFfnPart, "moegpt::decode_layer: part ", part,
              " is not 0 (the layer), 1 (attention's output) or 2 (the FFN's output)");
  const Weight wqkv{wqkv_, wqkv_scale, bits}, wo{wo_, wo_scale, bits}, w_in{w_in_, w_in_scale, bits},
      w_down{w_down_, w_down_scale, bits};
  for (const Weight* m : {&wqkv, &wo, &w_in, &w_down}) {
    if (m->tiled()) {
      moegpt::tiled_in_features(m->w, *m->scale, bits, "moegpt::decode_layer");
    } else if (m->quantized()) {
      moegpt::quantized_in_features(m->w, *m->scale, bits, "moegpt::decode_layer");
    }
  }
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "moegpt::decode_layer: fp32 or bf16, got ", dt);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "moegpt::decode_layer: x (B, D) contiguous on the CPU");
  for (const at::Tensor* t : {&attn_norm, &ffn_norm, &rope_cos, &rope_sin})
    TORCH_CHECK(t->scalar_type() == dt && t->device().is_cpu(), "moegpt::decode_layer: every tensor in x's dtype on the CPU");
  if (k_scale.has_value() || v_scale.has_value()) {  // an 8-bit cache
    const auto kt = k_cache.scalar_type();
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value() && (kt == at::kChar || kt == at::kFloat8_e4m3fn) &&
                v_cache.scalar_type() == kt && k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                k_scale->is_contiguous() && v_scale->is_contiguous() && k_scale->dim() == 2 &&
                k_scale->sizes() == v_scale->sizes() && k_scale->size(0) == k_cache.size(0) &&
                k_scale->size(1) == k_cache.size(1), "moegpt::decode_layer: an 8-bit cache is int8 or fp8 e4m3 "
                "(slots, G, Dh) with fp32 scales (slots, G) for keys and values");
  } else {
    TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt && k_cache.device().is_cpu(),
                "moegpt::decode_layer: every tensor in x's dtype on the CPU");
  }
  for (const Weight* m : {&wqkv, &wo, &w_in, &w_down})
    TORCH_CHECK((m->quantized() || m->w.scalar_type() == dt) && m->w.device().is_cpu(),
                "moegpt::decode_layer: every weight in x's dtype (or quantized) on the CPU");
  TORCH_CHECK(attn_norm.is_contiguous() && ffn_norm.is_contiguous() && rope_cos.is_contiguous() && rope_sin.is_contiguous(),
              "moegpt::decode_layer: norms and rope tables contiguous");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "moegpt::decode_layer: caches (slots, G, Dh) contiguous");
  const int64_t H = n_heads, G = k_cache.size(1), Dh = k_cache.size(2), D = x.size(1);
  TORCH_CHECK(G > 0 && H > 0 && H % G == 0 && Dh > 0 && Dh % 2 == 0, "moegpt::decode_layer: ", H, " query heads, ",
              G, " kv heads of dim ", Dh, " (kv heads must divide query heads, the head dim be even)");
  TORCH_CHECK(block_size > 0, "moegpt::decode_layer: block_size ", block_size, " must be >= 1");
  TORCH_CHECK(x.size(0) > 0, "moegpt::decode_layer: an empty batch");
  TORCH_CHECK(wqkv.w.dim() == 2 && wo.w.dim() == 2 && rope_cos.dim() == 2 && rope_cos.sizes() == rope_sin.sizes() &&
              attn_norm.numel() == D && ffn_norm.numel() == D && wqkv.out_features() == (H + 2 * G) * Dh &&
              wqkv.in_features() == D && wo.out_features() == D && wo.in_features() == H * Dh && rope_cos.size(1) == Dh,
              "moegpt::decode_layer: weight shapes do not match");
  for (const Weight* m : {&wqkv, &wo, &w_in, &w_down}) {
    const at::Tensor& t = m->w;
    const int64_t d = t.dim();
    TORCH_CHECK(m->quantized() ? t.stride(d - 1) == 1 : moegpt::stored_either_way(t.stride(d - 2), t.stride(d - 1), t.size(d - 2)),
                "moegpt::decode_layer: a matrix stored neither way");
  }
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == x.size(0) &&
              positions.is_contiguous(), "moegpt::decode_layer: positions (B,) int64");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.size(0) == x.size(0) &&
              block_tables.is_contiguous(), "moegpt::decode_layer: block_tables (B, nb) int64");
  int64_t* cp = nullptr;
  if (part != kAttentionPart) {  // (attention's output alone reads no expert: they may be elsewhere)
    TORCH_CHECK(w_in.w.dim() == 3 && w_down.w.dim() == 3 && w_in.w.size(0) == w_down.w.size(0) && w_in.in_features() == D &&
                w_down.out_features() == D &&
                w_down.in_features() == (swiglu ? w_in.out_features() / 2 : w_in.out_features()),
                "moegpt::decode_layer: expert shapes do not match");
    if (router.has_value()) {
      TORCH_CHECK(router->scalar_type() == dt && router->dim() == 2 && router->size(1) == D && first_expert >= 0 &&
                  first_expert + w_in.w.size(0) <= router->size(0) && (part == kFfnPart ||
                  router->size(0) == w_in.w.size(0)) && top_k >= 1 && top_k <= router->size(0),
                  "moegpt::decode_layer: router (E, D), the experts held [first_expert, first_expert + El) within "
                  "E (all E but for the FFN part alone), 1 <= top_k <= E");
      if (counts.has_value()) {
        TORCH_CHECK(counts->scalar_type() == at::kLong && counts->dim() == 2 && counts->is_contiguous() &&
                    counts->size(1) == router->size(0) && 0 <= counts_row && counts_row < counts->size(0),
                    "moegpt::decode_layer: counts (layers, E) int64");
        cp = counts->data_ptr<int64_t>() + counts_row * counts->size(1);
      }
    } else {
      TORCH_CHECK(w_in.w.size(0) == 1 && first_expert == 0, "moegpt::decode_layer: a dense layer has one expert");
    }
  }
  const Limits lim{max_rows_in_by_out, max_rows_out_by_in};
  if (dt == at::kFloat)
    return layer<float>(x, attn_norm, wqkv, wo, ffn_norm, router, w_in, w_down, k_cache, v_cache, rope_cos, rope_sin,
                        positions, block_tables, block_size, n_heads, top_k, swiglu, eps, cp, lim, k_scale, v_scale,
                        part, first_expert);
  return layer<c10::BFloat16>(x, attn_norm, wqkv, wo, ffn_norm, router, w_in, w_down, k_cache, v_cache, rope_cos,
                              rope_sin, positions, block_tables, block_size, n_heads, top_k, swiglu, eps, cp, lim,
                              k_scale, v_scale, part, first_expert);
}

// The final norm of a decode step (the model's rms_norm: fp32 statistics, scaled in x's dtype), one op.
at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() && weight.numel() == x.size(1) &&
              weight.scalar_type() == x.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "moegpt::rms_norm: x (B, D) contiguous, fp32 or bf16, and a weight (D,) of its dtype");
  const int64_t B = x.size(0), D = x.size(1);
  std::vector<float> h(B * D);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_SWITCH(x.scalar_type(), "moegpt_rms_norm",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      rms_norm<float>(x.data_ptr<float>(), weight.data_ptr<float>(), B, D, static_cast<float>(eps), h.data());
      std::memcpy(out.data_ptr<float>(), h.data(), B * D * sizeof(float));
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      rms_norm<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), B, D,
                              static_cast<float>(eps), h.data());
      c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
      for (int64_t i = 0; i < B * D; ++i) o[i] = static_cast<c10::BFloat16>(h[i]);  // exact: h is rounded
    }));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moegpt, CPU, m) {
  m.impl("decode_layer", &decode_layer);
  m.impl("rms_norm", &rms_norm_op);
}
