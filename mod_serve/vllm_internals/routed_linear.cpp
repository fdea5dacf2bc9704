// A routed layer's linear on vLLM's oneDNN GEMM, in row pieces of a few fixed sizes.
//
// vLLM's CPU oneDNN GEMM (_C::onednn_mm) builds a oneDNN primitive per row count M (1-8 ms each
// here) and keeps the last 32 per weight. A dense layer sees the step's token count; a routed
// layer sees how many of them its router let in, which is new in nearly every prefill step (a
// served 2048-token prompt: 60 routed linears each building a primitive, ~280 ms of a ~1.05 s
// prefill here, where the same prompt sent twice takes ~0.77 s). So the rows go through in
// pieces: each power of two >= 64 of M's binary expansion, then the rest (< 64) zero-padded up to
// 16, 32 or 64 (as it is if <= 8). Rows are independent in a GEMM: a piece is the same product,
// the padding rows' outputs are dropped. Up to 8192 rows that is 18 sizes (within vLLM's cache,
// and built ahead by the worker's warm-up), at most 8 GEMM calls, and at most 31 padded rows.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace {

constexpr int64_t kSmallest = 64;  // pieces below this size are one padded remainder

int64_t remainder_rows(int64_t r) {  // r < kSmallest: the GEMM size it runs at
  if (r <= 8) return r;
  int64_t q = 16;
  while (q < r) q *= 2;
  return q;
}

std::vector<int64_t> row_pieces(int64_t rows) {  // the GEMM sizes M runs as, in order
  std::vector<int64_t> out;
  for (int b = 62; (int64_t(1) << b) >= kSmallest; --b)
    if (rows & (int64_t(1) << b)) out.push_back(int64_t(1) << b);
  if (int64_t r = rows % kSmallest) out.push_back(remainder_rows(r));
  return out;
}

at::Tensor onednn_mm_rows(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& handler,
                          int64_t n) {
  static const c10::OperatorHandle onednn_mm = c10::Dispatcher::singleton().findSchemaOrThrow("_C::onednn_mm", "");
  auto mm = [&](const at::Tensor& c, const at::Tensor& a) {
    torch::jit::Stack stack{c, a, bias, handler};
    onednn_mm.callBoxed(stack);
  };
  const int64_t k = x.size(-1);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  const at::Tensor a = x.reshape({-1, k});
  const int64_t rows = a.size(0);
  at::Tensor c = at::empty({rows, n}, x.options());
  int64_t off = 0;
  for (int b = 62; (int64_t(1) << b) >= kSmallest; --b) {
    const int64_t p = int64_t(1) << b;
    if (rows & p) {
      mm(c.narrow(0, off, p), a.narrow(0, off, p));
      off += p;
    }
  }
  const int64_t r = rows - off, q = remainder_rows(r);
  if (r > 0 && q == r) {
    mm(c.narrow(0, off, r), a.narrow(0, off, r));
  } else if (r > 0) {
    at::Tensor ap = at::zeros({q, k}, x.options());
    ap.narrow(0, 0, r).copy_(a.narrow(0, off, r));
    at::Tensor cp = at::empty({q, n}, x.options());
    mm(cp, ap);
    c.narrow(0, off, r).copy_(cp.narrow(0, 0, r));
  }
  return c.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mod_serve, m) {
  m.def("onednn_mm_rows(Tensor x, Tensor? bias, Tensor handler, int n) -> Tensor");
  m.def("row_pieces(int rows) -> int[]", row_pieces);
}

TORCH_LIBRARY_IMPL(mod_serve, CPU, m) { m.impl("onednn_mm_rows", onednn_mm_rows); }
