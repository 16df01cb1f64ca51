// moegpt's CPU decode kernels, registered with torch.library as torch.ops.moegpt.*.
//
// gemv(x, w): x (M, I) times a weight w given as nn.Linear stores it, (O, I), -> (M, O), for the few
// rows of a decode step (M <= 8). The weight may be stored (in, out) (w's stride(0) == 1, the decode
// layout of fp32 weights) or (out, in) (stride(1) == 1); fp32 or bf16, accumulated in fp32.
// Each thread streams one contiguous block of the weight's stored rows, one row at a time: what
// reached ~0.94 of the read bandwidth on a 2-core EPYC at batch 1 (row blocking and software
// prefetch were slower there). The pure-PyTorch reference is x @ w.T (moegpt/kernels/__init__.py).
//
// expert_gemv(x, w, expert): row a of x (A, I) times expert expert[a]'s matrix of w (E, O, I) ->
// (A, O). Rows that chose the same expert run together, so each chosen expert's matrix is read once
// and the experts no row chose are never read: the few-token MoE of a decode step.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

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
void gemv_in_by_out(const float* x, const T* w, int64_t M, int64_t I, int64_t O, int64_t ld, float* out) {
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

// w stored (O, I) with row stride ld: out[m, o] = dot(x[m], w[o]). Threads split the O rows.
template <typename T>
void gemv_out_by_in(const float* x, const T* w, int64_t M, int64_t I, int64_t O, int64_t ld, float* out) {
  const int nt = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(O)));
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t o0 = O * t / n, o1 = O * (t + 1) / n;
    for (int64_t o = o0; o < o1; ++o) {
      const T* row = w + o * ld;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * I;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < I; ++i) acc += xm[i] * to_float(row[i]);
        out[m * O + o] = acc;
      }
    }
  }
}

// out (M, O) = x (M, I) fp32 times w (O, I) stored either way (strides so, si of its O and I dims).
template <typename T>
void product(const float* x, const T* w, int64_t M, int64_t I, int64_t O, int64_t so, int64_t si, float* out) {
  if (so == 1 && O > 1) {
    gemv_in_by_out(x, w, M, I, O, si, out);
  } else {
    gemv_out_by_in(x, w, M, I, O, so, out);
  }
}

bool stored_either_way(int64_t so, int64_t si, int64_t O) { return (so == 1 && O > 1) || si == 1; }

at::Tensor expert_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(2), "moegpt::expert_gemv: x (A, I) and w (E, O, I), got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(expert.dim() == 1 && expert.size(0) == x.size(0) && expert.scalar_type() == at::kLong,
              "moegpt::expert_gemv: expert must be (A,) int64");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && expert.device().is_cpu(), "moegpt::expert_gemv runs on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "moegpt::expert_gemv: fp32 or bf16 weights");
  const int64_t A = x.size(0), I = x.size(1), E = w.size(0), O = w.size(1);
  const int64_t so = w.stride(1), si = w.stride(2), se = w.stride(0);
  TORCH_CHECK(stored_either_way(so, si, O), "moegpt::expert_gemv: each expert stored (in, out) or (out, in), got strides ",
              w.strides());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor ex = expert.contiguous();
  const int64_t* e = ex.data_ptr<int64_t>();
  for (int64_t a = 0; a < A; ++a) TORCH_CHECK(0 <= e[a] && e[a] < E, "moegpt::expert_gemv: expert ", e[a], " of ", E);
  std::vector<int64_t> order(A);
  for (int64_t a = 0; a < A; ++a) order[a] = a;
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return e[p] < e[q]; });
  at::Tensor out = at::empty({A, O}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  std::vector<float> xs, ys;
  for (int64_t start = 0; start < A;) {
    int64_t end = start;
    while (end < A && e[order[end]] == e[order[start]]) ++end;
    const int64_t M = end - start;
    xs.resize(M * I);
    ys.resize(M * O);
    for (int64_t r = 0; r < M; ++r) std::memcpy(&xs[r * I], xp + order[start + r] * I, I * sizeof(float));
    const int64_t expert_id = e[order[start]];
    AT_DISPATCH_SWITCH(w.scalar_type(), "moegpt_expert_gemv",
      AT_DISPATCH_CASE(at::kFloat, [&] { product(xs.data(), w.data_ptr<float>() + expert_id * se, M, I, O, so, si, ys.data()); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        product(xs.data(), w.data_ptr<c10::BFloat16>() + expert_id * se, M, I, O, so, si, ys.data());
      }));
    for (int64_t r = 0; r < M; ++r) std::memcpy(op + order[start + r] * O, &ys[r * O], O * sizeof(float));
    start = end;
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "moegpt::gemv: x (M, I) and w (O, I), got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "moegpt::gemv runs on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "moegpt::gemv: fp32 or bf16 weights");
  const int64_t M = x.size(0), I = x.size(1), O = w.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, O}, x.options().dtype(at::kFloat));
  const bool in_by_out = w.stride(0) == 1 && O > 1;
  TORCH_CHECK(in_by_out || w.stride(1) == 1, "moegpt::gemv: w must be stored (in, out) or (out, in), got strides ",
              w.strides());
  const int64_t ld = in_by_out ? w.stride(1) : w.stride(0);
  AT_DISPATCH_SWITCH(w.scalar_type(), "moegpt_gemv",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      const float* wp = w.data_ptr<float>();
      in_by_out ? gemv_in_by_out(xf.data_ptr<float>(), wp, M, I, O, ld, out.data_ptr<float>())
                : gemv_out_by_in(xf.data_ptr<float>(), wp, M, I, O, ld, out.data_ptr<float>());
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
      in_by_out ? gemv_in_by_out(xf.data_ptr<float>(), wp, M, I, O, ld, out.data_ptr<float>())
                : gemv_out_by_in(xf.data_ptr<float>(), wp, M, I, O, ld, out.data_ptr<float>());
    }));
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(moegpt, m) {
  m.def("gemv(Tensor x, Tensor w) -> Tensor");
  m.def("expert_gemv(Tensor x, Tensor w, Tensor expert) -> Tensor");
}

TORCH_LIBRARY_IMPL(moegpt, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("expert_gemv", &expert_gemv);
}
