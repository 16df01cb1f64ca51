// dequantize_tiles(tiles, scale, bits, dtype): quantized weights in the decode kernels' tiles (qtiles.h,
// moegpt/quant/scheme.py: tile) -> the weight (..., O, I) in fp32 or bf16, what a plain model's forward
// multiplies by (prefill, the quality gates). One pass over the tiles, each tile's 16 rows written
// as they are read, where the PyTorch reference (scheme.py: dequantize(*rows(...))) untiles into a
// row-packed copy, unpacks, widens and scales in several passes (~6x slower for `small`'s experts).
//
// tiles (..., T, 16 P) uint8: per 64 bytes, 16 rows' values for the same inputs, one row per 4-byte
// lane: int8, 4 consecutive inputs per lane (value + 128); int4, 8 per lane, inputs 8k..8k+3 in the
// low nibbles of the lane's bytes and 8k+4..8k+7 in the high ones (value + 8). scale (..., T, G, 16)
// fp32: group g's scales of the tile's 16 rows. w[16 t + r, i] = q * scale[t, i / (I / G), r],
// computed in fp32 and rounded once to dtype: bitwise the reference.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

constexpr int64_t TILE = 16;

template <typename out_t>
void dequantize_tile(const uint8_t* tile, const float* scale, int64_t I, int64_t G, int bits, out_t* out) {
  // tile: 16 * P bytes; scale: (G, 16); out: (16, I) rows, each written front to back
  const int64_t step = bits == 8 ? 4 : 8;  // inputs per lane
  const int64_t chunks = I / step, per_group = I / G / step;  // a lane's inputs share one group
  for (int64_t r = 0; r < TILE; ++r) {
    out_t* row = out + r * I;
    const uint8_t* lane = tile + 4 * r;
    for (int64_t g = 0; g < G; ++g) {
      const float sr = scale[g * TILE + r];
      for (int64_t k = g * per_group; k < (g + 1) * per_group; ++k) {
        const uint8_t* b = lane + k * 64;
        out_t* o = row + k * step;
        if (bits == 8) {
          for (int j = 0; j < 4; ++j) o[j] = static_cast<out_t>(static_cast<float>(static_cast<int>(b[j]) - 128) * sr);
        } else {
          for (int j = 0; j < 4; ++j) {
            o[j] = static_cast<out_t>(static_cast<float>(static_cast<int>(b[j] & 0xF) - 8) * sr);
            o[4 + j] = static_cast<out_t>(static_cast<float>(static_cast<int>(b[j] >> 4) - 8) * sr);
          }
        }
      }
    }
  }
  (void)chunks;
}

at::Tensor dequantize_tiles(const at::Tensor& tiles, const at::Tensor& scale, int64_t bits, at::ScalarType dtype) {
  TORCH_CHECK(bits == 8 || bits == 4, "dequantize_tiles: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.dim() >= 2, "dequantize_tiles: tiles must be uint8 (..., T, 16 P)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == tiles.dim() + 1 && scale.size(-1) == TILE,
              "dequantize_tiles: scale must be fp32 (..., T, G, 16)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize_tiles: dtype must be float32 or bfloat16");
  const int64_t T = tiles.size(-2), B = tiles.size(-1), G = scale.size(-2);
  TORCH_CHECK(B > 0 && B % (TILE * 4) == 0, "dequantize_tiles: a tile's bytes (", B, ") are not whole 64-byte chunks");
  const int64_t I = B / TILE * 8 / bits;
  const int64_t step = bits == 8 ? 4 : 8;
  TORCH_CHECK(G > 0 && I % G == 0 && (I / G) % step == 0, "dequantize_tiles: ", G, " groups do not divide ", I,
              " inputs in whole lanes");
  for (int64_t d = 0; d < tiles.dim() - 2; ++d) {
    TORCH_CHECK(scale.size(d) == tiles.size(d), "dequantize_tiles: scale and tiles differ in dim ", d);
  }
  TORCH_CHECK(scale.size(-3) == T, "dequantize_tiles: scale has ", scale.size(-3), " tiles, tiles ", T);
  auto t = tiles.contiguous();
  auto s = scale.contiguous();
  std::vector<int64_t> shape(tiles.sizes().begin(), tiles.sizes().end() - 2);
  shape.push_back(T * TILE);
  shape.push_back(I);
  auto out = at::empty(shape, tiles.options().dtype(dtype));
  const int64_t n = t.numel() / B;  // tiles in all
  const uint8_t* tp = t.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  AT_DISPATCH_SWITCH(dtype, "dequantize_tiles",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      float* op = out.data_ptr<float>();
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dequantize_tile(tp + i * B, sp + i * G * TILE, I, G, bits, op + i * TILE * I);
      });
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      at::BFloat16* op = out.data_ptr<at::BFloat16>();
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dequantize_tile(tp + i * B, sp + i * G * TILE, I, G, bits, op + i * TILE * I);
      });
    }));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moegpt, m) {
  m.def("dequantize_tiles(Tensor tiles, Tensor scale, int bits, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(moegpt, CPU, m) {
  m.impl("dequantize_tiles", &dequantize_tiles);
}
