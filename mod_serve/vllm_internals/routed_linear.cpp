// A routed layer's linear on vLLM's oneDNN GEMM, with its row count rounded up to a bucket.
//
// vLLM's CPU oneDNN GEMM (_C::onednn_mm) builds a oneDNN primitive per row count M and keeps the
// last 32 per weight. A dense layer sees the step's token count; a routed layer sees how many of
// them its router let in, which is new in nearly every prefill step (a served 2048-token prompt:
// 60 routed linears each building a primitive, ~280 ms of a ~1.05 s prefill here, where the same
// prompt sent twice takes ~0.77 s). Padding the rows to a bucket (every count up to 8, then
// 2^k and 1.5 * 2^k: at most 28 row counts up to 8192, within vLLM's 32-primitive cache) makes
// every later prefill reuse a primitive, for at most a third more rows. Rows are independent in a
// GEMM: the padding rows are zeros and their outputs are dropped.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace {

int64_t bucket_rows(int64_t rows) {
  if (rows <= 8) return rows;
  int64_t p = int64_t(1) << (63 - __builtin_clzll(static_cast<uint64_t>(rows)));  // largest power of 2 <= rows
  if (rows == p) return p;
  return rows <= p + p / 2 ? p + p / 2 : 2 * p;
}

at::Tensor onednn_mm_rows(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& handler,
                          int64_t n) {
  static const c10::OperatorHandle onednn_mm = c10::Dispatcher::singleton().findSchemaOrThrow("_C::onednn_mm", "");
  const int64_t k = x.size(-1);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  at::Tensor a = x.reshape({-1, k});
  const int64_t rows = a.size(0);
  if (rows == 0) return at::empty(out_sizes, x.options());
  const int64_t padded = bucket_rows(rows);
  if (padded != rows) {
    at::Tensor p = at::empty({padded, k}, x.options());
    p.narrow(0, 0, rows).copy_(a);
    p.narrow(0, rows, padded - rows).zero_();
    a = p;
  }
  at::Tensor c = at::empty({padded, n}, x.options());
  torch::jit::Stack stack{c, a, bias, handler};
  onednn_mm.callBoxed(stack);
  return c.narrow(0, 0, rows).view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mod_serve, m) {
  m.def("onednn_mm_rows(Tensor x, Tensor? bias, Tensor handler, int n) -> Tensor");
  m.def("bucket_rows(int rows) -> int", bucket_rows);
}

TORCH_LIBRARY_IMPL(mod_serve, CPU, m) { m.impl("onednn_mm_rows", onednn_mm_rows); }
