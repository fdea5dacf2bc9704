// A routed layer's attention on the CPU, as one C++ call, in any step (prefill, decode, mixed).
//
// The Python path (attention.py: _compact_host, _metadata, CpuAttentionKernels) does the same
// work with ~20 Python operations per routed layer and step; here it is one call:
//   1. compaction: the routed tokens (sorted step indices) of request r get compact indices
//      prior[r], prior[r] + 1, ... in step order, stored in slot block_table[r, c / B] * B + c % B;
//      new[r] counts them;
//   2. the compact metadata vLLM's CPU builder would build: query_start_loc = [0, cumsum(new)],
//      seq_lens = prior + new, and its scheduler metadata (_C::get_scheduler_metadata);
//   3. vLLM's two CPU attention kernels (_C::cpu_attn_reshape_and_cache, then
//      _C::cpu_attention_with_kv_cache) with the layer's constant arguments.
// The kernels are vLLM's own, found through the dispatcher by name and called boxed, so this
// file depends on their schemas only (vLLM 0.32; checked by tests/test_vllm_cpu_decode.py).
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace mod_serve {
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);  // routed_linear.cpp
}

namespace {

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

struct RoutedAttention {
  // the layer's KV cache, as vLLM's CPU impl views it: [blocks, kv heads, block size, head size]
  at::Tensor key_cache, value_cache;
  int64_t num_heads, num_kv_heads, head_size, head_size_v, block_size;
  double scale, k_scale, v_scale, softcap;
  int64_t sliding_window;
  std::string isa, kv_cache_dtype;
  c10::optional<at::Tensor> alibi_slopes, sinks;
  // what vLLM's CPU metadata builder of the layer's KV cache group passes to its scheduler
  int64_t md_num_heads, md_num_kv_heads, md_head_dim, md_window;
  c10::ScalarType md_dtype;
  std::string md_isa, md_kv_cache_dtype;
  bool kv_split;
  c10::OperatorHandle scheduler_op, cache_op, attention_op;

  RoutedAttention(at::Tensor key_cache, at::Tensor value_cache, std::vector<int64_t> shape,
                  std::vector<double> scales, int64_t sliding_window, std::string isa,
                  std::string kv_cache_dtype, c10::optional<at::Tensor> alibi_slopes,
                  c10::optional<at::Tensor> sinks, std::vector<int64_t> md, const at::Tensor& md_dtype,
                  std::string md_isa, std::string md_kv_cache_dtype, bool kv_split)
      : key_cache(std::move(key_cache)),
        value_cache(std::move(value_cache)),
        num_heads(shape.at(0)),
        num_kv_heads(shape.at(1)),
        head_size(shape.at(2)),
        head_size_v(shape.at(3)),
        block_size(shape.at(4)),
        scale(scales.at(0)),
        k_scale(scales.at(1)),
        v_scale(scales.at(2)),
        softcap(scales.at(3)),
        sliding_window(sliding_window),
        isa(std::move(isa)),
        kv_cache_dtype(std::move(kv_cache_dtype)),
        alibi_slopes(std::move(alibi_slopes)),
        sinks(std::move(sinks)),
        md_num_heads(md.at(0)),
        md_num_kv_heads(md.at(1)),
        md_head_dim(md.at(2)),
        md_window(md.at(3)),
        md_dtype(md_dtype.scalar_type()),  // the builder's model dtype, carried by an empty tensor
        md_isa(std::move(md_isa)),
        md_kv_cache_dtype(std::move(md_kv_cache_dtype)),
        kv_split(kv_split),
        scheduler_op(find_op("_C::get_scheduler_metadata")),
        cache_op(find_op("_C::cpu_attn_reshape_and_cache")),
        attention_op(find_op("_C::cpu_attention_with_kv_cache")) {}

  // q [n, heads * head size], k and v [n, kv heads * head size] of the routed tokens; idx [n]
  // their step indices (sorted); token_req [step tokens] the batch row of each step token, or
  // empty where token i is request i's (a decode step); prior [reqs] and new [reqs] (int64, new
  // zero and written) this layer's row of the step's counts; block_table [reqs, blocks] (int32)
  // this layer's. Returns [n, heads * head size v].
  at::Tensor operator()(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                        const at::Tensor& token_req, const at::Tensor& prior, at::Tensor new_row,
                        const at::Tensor& block_table) {
    const int64_t n = idx.size(0), reqs = prior.size(0), tokens = token_req.numel();
    TORCH_CHECK(idx.scalar_type() == at::kLong && token_req.scalar_type() == at::kLong &&
                    prior.scalar_type() == at::kLong && new_row.scalar_type() == at::kLong &&
                    block_table.scalar_type() == at::kInt,
                "mod-serve routed attention: unexpected index dtypes");
    TORCH_CHECK(prior.is_contiguous() && new_row.is_contiguous() && idx.is_contiguous() && token_req.is_contiguous() &&
                    block_table.stride(1) == 1 && block_table.size(0) >= reqs && new_row.size(0) == reqs,
                "mod-serve routed attention: unexpected index layouts");
    const int64_t* steps = idx.data_ptr<int64_t>();
    const int64_t* req_of = tokens ? token_req.data_ptr<int64_t>() : nullptr;
    const int64_t* pr = prior.data_ptr<int64_t>();
    int64_t* nw = new_row.data_ptr<int64_t>();
    const int32_t* bt = block_table.data_ptr<int32_t>();
    const int64_t bt_stride = block_table.stride(0), bt_cols = block_table.size(1);

    auto i64 = at::TensorOptions().dtype(at::kLong);
    auto i32 = at::TensorOptions().dtype(at::kInt);
    at::Tensor slots = at::empty({n}, i64), seq_lens = at::empty({reqs}, i32), qsl = at::empty({reqs + 1}, i32);
    int64_t* sl = slots.data_ptr<int64_t>();
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = steps[j];
      TORCH_CHECK(i >= 0 && (j == 0 || i > steps[j - 1]) && (!req_of || i < tokens),
                  "mod-serve routed attention: bad routed rows");
      const int64_t r = req_of ? req_of[i] : i;
      TORCH_CHECK(r >= 0 && r < reqs, "mod-serve routed attention: bad routed rows");
      const int64_t c = pr[r] + nw[r]++, col = c / block_size;
      TORCH_CHECK(col < bt_cols, "mod-serve routed attention: compact index past the block table");
      sl[j] = static_cast<int64_t>(bt[r * bt_stride + col]) * block_size + c % block_size;
    }
    int32_t* q_loc = qsl.data_ptr<int32_t>();
    int32_t* lens = seq_lens.data_ptr<int32_t>();
    q_loc[0] = 0;
    for (int64_t r = 0; r < reqs; ++r) {
      q_loc[r + 1] = q_loc[r] + static_cast<int32_t>(nw[r]);
      lens[r] = static_cast<int32_t>(pr[r] + nw[r]);
    }
    at::Tensor table = block_table.narrow(0, 0, reqs);

    torch::jit::Stack stack{reqs, md_num_heads, md_num_kv_heads, md_head_dim, seq_lens, md_dtype, qsl,
                            true, md_window, md_isa, kv_split, c10::IValue(), md_kv_cache_dtype};
    scheduler_op.callBoxed(stack);
    at::Tensor scheduler_metadata = stack.at(0).toTensor();

    stack = {k.view({n, num_kv_heads, head_size}), v.view({n, num_kv_heads, head_size_v}), key_cache, value_cache,
             slots, isa, k_scale, v_scale, kv_cache_dtype};
    cache_op.callBoxed(stack);

    at::Tensor out = mod_serve::pooled_empty({n, num_heads, head_size_v}, q.options());
    c10::IValue alibi = alibi_slopes ? c10::IValue(*alibi_slopes) : c10::IValue();
    c10::IValue s_aux = sinks ? c10::IValue(*sinks) : c10::IValue();
    stack = {q.view({n, num_heads, head_size}), key_cache, value_cache, out, qsl, seq_lens, scale, true, alibi,
             c10::SymInt(sliding_window), table, softcap, scheduler_metadata, s_aux, c10::IValue(),
             k_scale, v_scale, kv_cache_dtype};
    attention_op.callBoxed(stack);
    return out.view({n, num_heads * head_size_v});
  }
};

// ---- the routed layer's two graph ops on the CPU -------------------------------------------
// vLLM's compiled graph calls mod_serve::route_cpu and mod_serve::routed_attention_cpu where the
// Python ops mod_serve::route and mod_serve::routed_attention would be (routed_op.py). In a real
// step they run here without entering Python: the decision g >= p (float32, as torch compares a
// float32 tensor with a Python float; each layer's indices kept for the prefix cache's boundary
// log when the step crosses a block boundary) and the bound layer's RoutedAttention. Otherwise
// (a warm-up run; per-request thresholds or tensor parallelism for the decision; a layer not
// bound yet for attention) they call the Python op.

struct Step {
  bool route_here = false;   // one threshold for the step, nothing to share across TP ranks
  bool log_routes = false;   // keep each layer's indices (the step crosses a block boundary)
  bool attend_here = false;  // a real step
  float p = 0.f;
  int64_t num_tokens = 0;
  at::Tensor token_req;             // [tokens] int64 batch row of each token; empty in a decode step
  at::Tensor prior, new_counts;     // [routed layers, reqs] int64, the step's counts
  std::vector<at::Tensor> tables;   // per routed slot: its block table (int32)
  std::vector<at::Tensor> routed_log;  // the indices route_cpu returned, in call (layer) order
};

struct Bound {
  int64_t slot;
  std::weak_ptr<RoutedAttention> op;  // owned by the layer (Python); gone with its engine
};

Step g_step;
std::unordered_map<std::string, Bound> g_bound;  // the layer's op name (process-unique) -> its call

void set_step(bool route_here, bool log_routes, double p, int64_t num_tokens, bool attend_here, at::Tensor token_req,
              at::Tensor prior, at::Tensor new_counts, std::vector<at::Tensor> tables) {
  Step step;
  step.route_here = route_here;
  step.log_routes = log_routes;
  step.attend_here = attend_here;
  step.token_req = std::move(token_req);
  step.p = static_cast<float>(p);
  step.num_tokens = num_tokens;
  step.prior = std::move(prior);
  step.new_counts = std::move(new_counts);
  step.tables = std::move(tables);
  g_step = std::move(step);
}

void clear_step() { g_step = Step{}; }

std::vector<at::Tensor> take_routed_log() { return std::exchange(g_step.routed_log, {}); }

void bind_layer(const std::string& name, int64_t slot, std::shared_ptr<RoutedAttention> op) {
  for (auto it = g_bound.begin(); it != g_bound.end();) {  // drop layers of engines since closed
    it = it->second.op.expired() ? g_bound.erase(it) : std::next(it);
  }
  g_bound[name] = Bound{slot, op};
}

at::Tensor route_cpu(const at::Tensor& g, c10::string_view layer_name) {
  if (!g_step.route_here || g.scalar_type() != at::kFloat || g.dim() != 1 || !g.is_contiguous()) {
    static const c10::OperatorHandle python_op = find_op("mod_serve::route");
    torch::jit::Stack stack{g, std::string(layer_name)};
    python_op.callBoxed(stack);
    return stack.at(0).toTensor();
  }
  const int64_t tokens = std::min<int64_t>(g.size(0), g_step.num_tokens);  // padding rows never route
  const float* x = g.data_ptr<float>();
  const float p = g_step.p;
  int64_t n = 0;
  for (int64_t i = 0; i < tokens; ++i) n += x[i] >= p;
  at::Tensor idx = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = idx.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < tokens; ++i) {
    if (x[i] >= p) out[j++] = i;
  }
  if (g_step.log_routes) {
    g_step.routed_log.push_back(idx);
    return idx.clone();  // the log keeps its own, as the Python op's does
  }
  return idx;
}

at::Tensor routed_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                                c10::string_view layer_name) {
  if (g_step.attend_here) {
    auto it = g_bound.find(std::string(layer_name));
    if (it != g_bound.end()) {
      if (auto op = it->second.op.lock()) {
        const int64_t slot = it->second.slot;
        if (idx.size(0) == 0) return at::empty({0, op->num_heads * op->head_size_v}, q.options());
        return (*op)(q, k, v, idx, g_step.token_req, g_step.prior.select(0, slot),
                     g_step.new_counts.select(0, slot), g_step.tables.at(slot));
      }
    }
  }
  static const c10::OperatorHandle python_op = find_op("mod_serve::routed_attention");
  torch::jit::Stack stack{q, k, v, idx, std::string(layer_name)};
  python_op.callBoxed(stack);
  return stack.at(0).toTensor();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mod_serve, m) {
  m.def("route_cpu(Tensor g, str layer_name) -> Tensor");
  m.def("routed_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor idx, str layer_name) -> Tensor");
}

TORCH_LIBRARY_IMPL(mod_serve, CPU, m) {
  m.impl("route_cpu", route_cpu);
  m.impl("routed_attention_cpu", routed_attention_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_step", &set_step);
  m.def("clear_step", &clear_step);
  m.def("bind_layer", &bind_layer);
  m.def("take_routed_log", &take_routed_log);
  pybind11::class_<RoutedAttention, std::shared_ptr<RoutedAttention>>(m, "RoutedAttention")
      .def(pybind11::init<at::Tensor, at::Tensor, std::vector<int64_t>, std::vector<double>, int64_t, std::string,
                          std::string, c10::optional<at::Tensor>, c10::optional<at::Tensor>, std::vector<int64_t>,
                          at::Tensor, std::string, std::string, bool>())
      .def("__call__", &RoutedAttention::operator());
}
