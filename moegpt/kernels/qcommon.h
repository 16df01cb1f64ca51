// What moegpt's quantized products share (moegpt/quant/scheme.py): a quantized weight as the
// kernels see it, the activation blocks that int8-activation products quantize, and the checks.
//
// w (O, P): int8 one value per byte, int4 two (the even-indexed one in the low nibble), each stored
// unsigned with an offset of 2^(bits-1); scale (O, G) fp32, G groups of I / G inputs (G = 1: one
// scale per output channel).

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


// Activations are quantized to int8 per row in blocks of BLOCK inputs (scheme.py:
// quantize_activations) where I is a multiple of BLOCK.
constexpr int64_t BLOCK = 128;


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
