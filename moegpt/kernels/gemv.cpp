// moegpt's CPU decode kernels, registered with torch.library as torch.ops.moegpt.* (the library's
// definitions are here; decode_layer.cpp holds the fused layer).
//
// gemv(x, w): x (M, I) times a weight w given as nn.Linear stores it, (O, I), -> (M, O), for the few
// rows of a decode step (up to 16); fp32 or bf16, accumulated in fp32; see gemv.h. The pure-PyTorch
// reference is x @ w.T (moegpt/kernels/__init__.py).
//
// qgemv(x, w, scale, bits): the same product with quantized weights, w (O, P) bytes and scale (O, G)
// fp32 (qgemv.h), or w in tiles (T, 16 P) and scale (T, G, 16) (qtiles.h); the reference is
// moegpt/quant/scheme.py: quantized_matmul.

#include <torch/library.h>

#include "gemv.h"
#include "qgemv.h"
#include "qtiles.h"

namespace {

using moegpt::product;

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "moegpt::gemv: x (M, I) and w (O, I), got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "moegpt::gemv runs on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "moegpt::gemv: fp32 or bf16 weights");
  const int64_t M = x.size(0), I = x.size(1), O = w.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, O}, x.options().dtype(at::kFloat));
  TORCH_CHECK(moegpt::stored_either_way(w.stride(0), w.stride(1), O),
              "moegpt::gemv: w must be stored (in, out) or (out, in), got strides ", w.strides());
  const bool x_is_bf16 = x.scalar_type() == at::kBFloat16;
  AT_DISPATCH_SWITCH(w.scalar_type(), "moegpt_gemv",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      product(xf.data_ptr<float>(), w.data_ptr<float>(), M, I, O, w.stride(0), w.stride(1), out.data_ptr<float>());
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      product(xf.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), M, I, O, w.stride(0), w.stride(1),
              out.data_ptr<float>(), x_is_bf16);
    }));
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor qgemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t bits) {
  if (scale.dim() == w.dim() + 1) {  // tiles (moegpt/quant/scheme.py: tile)
    const int64_t I = moegpt::tiled_in_features(w, scale, bits, "moegpt::qgemv");
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == I && x.device().is_cpu(),
                "moegpt::qgemv: x (M, I) on the CPU for w of ", I, " inputs, got ", x.sizes());
    const int64_t M = x.size(0), O = w.size(0) * 16;
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor out = at::empty({M, O}, x.options().dtype(at::kFloat));
    const moegpt::TiledWeight q{w.data_ptr<uint8_t>(), scale.data_ptr<float>(), bits, scale.size(1), w.stride(0),
                                scale.stride(0)};
    moegpt::tiled_product(xf.data_ptr<float>(), q, M, I, O, out.data_ptr<float>());
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
  }
  const int64_t I = moegpt::quantized_in_features(w, scale, bits, "moegpt::qgemv");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == I && x.device().is_cpu(),
              "moegpt::qgemv: x (M, I) on the CPU for w of ", I, " inputs, got ", x.sizes());
  const int64_t M = x.size(0), O = w.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, O}, x.options().dtype(at::kFloat));
  const moegpt::Quantized q{w.data_ptr<uint8_t>(), scale.data_ptr<float>(), bits, scale.size(1), w.stride(0), scale.stride(0)};
  moegpt::quantized_product(xf.data_ptr<float>(), q, M, I, O, out.data_ptr<float>());
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(moegpt, m) {
  m.def("gemv(Tensor x, Tensor w) -> Tensor");
  m.def("qgemv(Tensor x, Tensor w, Tensor scale, int bits) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor attn_norm, Tensor wqkv, Tensor wo, Tensor ffn_norm, Tensor? router, "
        "Tensor w_in, Tensor w_down, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rope_cos, Tensor rope_sin, "
        "Tensor positions, Tensor block_tables, int block_size, int n_heads, int top_k, bool swiglu, float eps, "
        "Tensor(c!)? counts, int counts_row, int max_rows_in_by_out, int max_rows_out_by_in, Tensor? wqkv_scale=None, "
        "Tensor? wo_scale=None, Tensor? w_in_scale=None, Tensor? w_down_scale=None, int bits=0, Tensor(d!)? k_scale=None, "
        "Tensor(e!)? v_scale=None, int part=0, int first_expert=0) -> Tensor");
  m.def("shm_sum(Tensor x, Tensor(a!) segment, int rank, int world, int seq, float timeout_s) -> Tensor");
}

TORCH_LIBRARY_IMPL(moegpt, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("qgemv", &qgemv);
}
