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
//
// The file also keeps routed layers' large outputs (GEMM and attention) in a few reused buffers:
// pooled_empty, below.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <c10/util/strides.h>

#include <vector>

namespace mod_serve {

// vLLM's compiled graph allocates each layer's outputs in every step, and Inductor lets a freed
// buffer serve a later one of the same size (in SmolLM2's dense graph a gate_up buffer serves two
// adjacent layers). A routed layer's outputs have a data-dependent row count: each of its GEMM
// outputs and its attention output is new memory, every layer, every step. glibc hands a freed
// block over 32 MiB back to the kernel (a gate_up output at 8192 rows is 48 MiB in bf16), and the
// next one is faulted in a 4 KiB page at a time as the GEMM writes it: 12,288 page faults, ~35 ms
// more than a GEMM into reused memory here, per routed layer of an 8192-token step. So outputs of
// 1 MiB or more come from a few buffers kept per thread, each handed out again once nothing holds
// its storage (its last view gone): the same memory, written in full by the op before anything
// reads it. (A routed layer's other buffers are Inductor's, at most 24 MiB at 8192 rows, which
// glibc can keep in its heap.)
constexpr int64_t kPooledBytes = int64_t(1) << 20;
constexpr size_t kPoolBuffers = 4;

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kPooledBytes || options.device().type() != c10::DeviceType::CPU) return at::empty(sizes, options);
  thread_local std::vector<at::Tensor> pool;  // flat byte buffers
  at::Tensor* pick = nullptr;   // the smallest free buffer that fits
  at::Tensor* spare = nullptr;  // else the smallest free one, replaced when the pool is full
  for (auto& buffer : pool) {
    if (buffer.storage().use_count() != 1) continue;  // a view of it is alive
    if (buffer.numel() >= bytes && (!pick || buffer.numel() < pick->numel())) pick = &buffer;
    if (!spare || buffer.numel() < spare->numel()) spare = &buffer;
  }
  if (!pick) {
    at::Tensor fresh = at::empty({bytes}, options.dtype(at::kByte));
    if (pool.size() < kPoolBuffers) {
      pool.push_back(std::move(fresh));
      pick = &pool.back();
    } else if (spare) {
      *spare = std::move(fresh);
      pick = spare;
    } else {
      return at::empty(sizes, options);  // every buffer in use
    }
  }
  return at::empty({0}, options).set_(pick->storage(), 0, sizes, c10::contiguous_strides(sizes));
}

}  // namespace mod_serve

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
  at::Tensor c = mod_serve::pooled_empty({rows, n}, x.options());
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
