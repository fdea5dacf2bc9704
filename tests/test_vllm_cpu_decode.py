"""A routed layer's attention as one C++ call (``mod_serve.vllm_internals.cpu_decode``), in decode
and prefill steps.

Checked against a plain PyTorch computation of the same thing: the compact slots (``block_table[r,
c // B] * B + c % B`` with ``c = prior[r]``, ``prior[r] + 1``, ... for request r's routed tokens in
step order), the routed tokens' causal attention over their requests' compact sequences, and the
layer's new counts; then in a real engine (CPU, float32, compiled and eager), where every step
must take the C++ call and still serve token for token like the reference model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mod_serve.vllm_internals import cpu_decode

HQ, HK, D, B = 4, 2, 64, 16


def _isa(dtype):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, B, D, "auto")


def _caches(num_blocks, dtype):
    kv = torch.zeros(num_blocks, HK, B, 2 * D, dtype=dtype)
    return kv.view(num_blocks, HK, 2 * B, D).chunk(2, dim=2)


def _write(k, v, key_cache, value_cache, slots, isa):
    torch.ops._C.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, 1.0, 1.0, "auto")


DTYPES = [torch.float32] + ([torch.bfloat16] if torch.cpu._is_avx512_bf16_supported() else [])


def _op(ext, key_cache, value_cache, dtype, isa):
    return ext.RoutedAttention(key_cache, value_cache, [HQ, HK, D, D, B], [D ** -0.5, 1.0, 1.0, 0.0], -1, isa, "auto",
                               None, None, [HQ, HK, D, -1], torch.empty(0, dtype=dtype), isa, "auto", False)


NO_TOKENS = torch.empty(0, dtype=torch.int64)

# (tokens per request this step, routed step indices): decode steps (one token per request,
# ``token_req`` empty), then prefill / mixed steps (a request's routed tokens take consecutive
# compact indices from its prior count, across a block end)
CASES = [([1] * 5, [0, 1, 2, 3, 4]), ([1] * 5, [1, 3, 4]), ([1] * 5, [2]),
         ([3, 1, 20, 2, 5], [0, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 24, 25, 27, 30]),
         ([3, 1, 20, 2, 5], [6, 7, 26])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_routed_attention_matches_plain_pytorch(case, dtype):
    ext = cpu_decode.extension()
    assert ext is not None, "the C++ routed ops must build here (g++ and torch's headers)"
    lengths, routed = CASES[case]
    g = torch.Generator().manual_seed(case)
    isa = _isa(dtype)
    prior = torch.tensor([0, 5, 15, 16, 40], dtype=torch.int64)  # empty, mid-block, block ends, 3rd block
    reqs, num_blocks = prior.numel(), 40
    token_req = torch.repeat_interleave(torch.arange(reqs), torch.tensor(lengths))
    decode = all(n == 1 for n in lengths)
    # rows past num_reqs (the runner's table has max_num_reqs rows) must be ignored
    block_table = torch.randperm(num_blocks, generator=g)[: (reqs + 2) * 5].view(reqs + 2, 5).to(torch.int32)
    key_cache, value_cache = _caches(num_blocks, dtype)

    def slot(r, c):
        return int(block_table[r, c // B]) * B + c % B

    # each request's compact context: prior[r] tokens already in the cache
    ctx_k = [torch.randn(int(n), HK, D, generator=g).to(dtype) for n in prior]
    ctx_v = [torch.randn(int(n), HK, D, generator=g).to(dtype) for n in prior]
    for r in range(reqs):
        if prior[r]:
            slots = torch.tensor([slot(r, c) for c in range(int(prior[r]))], dtype=torch.int64)
            _write(ctx_k[r], ctx_v[r], key_cache, value_cache, slots, isa)

    n = len(routed)
    rows = [int(token_req[i]) for i in routed]
    compact = [int(prior[r]) + rows[:j].count(r) for j, r in enumerate(rows)]
    q = torch.randn(n, HQ * D, generator=g).to(dtype)
    qkv = torch.randn(n, 2 * HK * D + 8, generator=g).to(dtype)  # k, v as strided views, as in the graph
    k, v = qkv[:, : HK * D], qkv[:, HK * D: 2 * HK * D]
    new = torch.zeros(reqs, dtype=torch.int64)
    want_k, want_v = key_cache.clone(), value_cache.clone()
    _write(k.reshape(n, HK, D), v.reshape(n, HK, D), want_k, want_v,
           torch.tensor([slot(r, c) for r, c in zip(rows, compact)], dtype=torch.int64), isa)

    out = _op(ext, key_cache, value_cache, dtype, isa)(q, k, v, torch.tensor(routed, dtype=torch.int64),
                                                       NO_TOKENS if decode else token_req, prior, new, block_table)

    assert new.tolist() == [rows.count(r) for r in range(reqs)]
    assert torch.equal(key_cache, want_k) and torch.equal(value_cache, want_v)  # only the routed slots written
    assert out.shape == (n, HQ * D)
    for j, r in enumerate(rows):  # causal: the request's compact context, then its routed tokens up to j
        mine = [i for i in range(j + 1) if rows[i] == r]
        keys = torch.cat([ctx_k[r], k[mine].view(-1, HK, D)]).float().repeat_interleave(HQ // HK, dim=1)
        values = torch.cat([ctx_v[r], v[mine].view(-1, HK, D)]).float().repeat_interleave(HQ // HK, dim=1)
        scores = torch.einsum("hd,thd->ht", q[j].view(HQ, D).float(), keys) * D ** -0.5
        want = torch.einsum("ht,thd->hd", scores.softmax(-1), values).reshape(-1)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[j].float(), want, rtol=tol, atol=tol)


def test_routed_attention_refuses_rows_out_of_order():
    ext = cpu_decode.extension()
    key_cache, value_cache = _caches(4, torch.float32)
    op = _op(ext, key_cache, value_cache, torch.float32, _isa(torch.float32))
    q, kv = torch.zeros(2, HQ * D), torch.zeros(2, HK * D)
    table = torch.zeros(2, 1, dtype=torch.int32)
    zeros = torch.zeros(2, dtype=torch.int64)
    for idx, token_req in [([1, 0], NO_TOKENS), ([0, 0], NO_TOKENS), ([0, 3], torch.tensor([0, 0, 1]))]:
        with pytest.raises(RuntimeError, match="bad routed rows"):
            op(q, kv, kv, torch.tensor(idx), token_req, zeros, zeros.clone(), table)


def _route_op_python(layer_name: str):
    """A routed layer whose Python ``route`` op records its calls (the C++ op's fallback)."""
    from mod_serve.vllm_internals.routed_op import register_routed_layer

    class Layer:
        calls = []

        def route(self, g):
            self.calls.append(g)
            return torch.tensor([-1])

    layer = Layer()
    return layer, register_routed_layer(layer, layer_name)


def test_route_op_decides_like_torch_and_defers_to_python_outside_a_step():
    """``mod_serve::route_cpu`` is ``(g >= p).nonzero()`` as torch computes it for a float32 tensor
    and a Python float (p rounded to float32: 0.7 routes a gate of float32(0.7), which a float64
    comparison would not), over the step's tokens only (padding rows never route); outside a step
    the C++ op calls the Python op."""
    from mod_serve.vllm_internals.routed_op import cpu_ops, route

    assert cpu_ops()
    ext = cpu_decode.extension()
    layer, name = _route_op_python("model.layers.0")
    empty = torch.empty(0, dtype=torch.int64)
    g = torch.rand(40, generator=torch.Generator().manual_seed(0))
    g[[3, 9]] = torch.tensor(0.7, dtype=torch.float32)
    assert float(g[3]) < 0.7  # float32(0.7) is below 0.7
    try:
        for p, tokens in [(0.7, 40), (0.7, 33), (0.0, 40), (1.0, 40), (0.25, 1)]:
            ext.set_step(True, False, p, tokens, False, empty, empty, empty, [])
            got = route(g, name, in_cpp=True)
            assert torch.equal(got, (g[:tokens] >= p).nonzero().squeeze(-1)), (p, tokens)
        assert ext.take_routed_log() == []
        ext.set_step(True, True, 0.7, 40, False, empty, empty, empty, [])  # a step crossing a block boundary
        first, second = route(g, name, in_cpp=True), route(g[:20], name, in_cpp=True)
        assert {3, 9} <= set(first.tolist())
        log = ext.take_routed_log()  # each call's indices, in call (layer) order, kept apart from the graph's
        assert [x.tolist() for x in log] == [first.tolist(), second.tolist()] and log[0].data_ptr() != first.data_ptr()
        assert ext.take_routed_log() == []
        assert not layer.calls
        ext.set_step(False, False, 0.0, 40, False, empty, empty, empty, [])  # e.g. per-request thresholds
        assert route(g, name, in_cpp=True).tolist() == [-1] and len(layer.calls) == 1
        ext.clear_step()
        assert route(g, name, in_cpp=True).tolist() == [-1] and len(layer.calls) == 2
    finally:
        ext.clear_step()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compiled", "eager", "python-attention"])
def test_engine_steps_take_the_cpp_call(mode, tmp_path, monkeypatch):
    """Every step of every routed layer attends through the C++ call (the Python compaction never
    runs); compiled, the graph's C++ ops decide every step with one threshold, and each layer's
    Python attention op runs once, to bind it (in the first step). The engine still serves like the
    reference model: greedy tokens and per-layer routed counts. ``python-attention``: compiled,
    with the C++ attention unavailable (``cpu_decode.bind`` gives None): the Python compaction
    serves every step, and the same tokens and counts."""
    from mod_serve.vllm_internals import attention
    from mod_serve.vllm_model import MoDLlamaDecoderLayer
    from tests.test_vllm_layouts import MAX_TOKENS, random_prompts, small_mod_dir
    from tests.vllm_helpers import COMPILED, greedy, inproc_llm, reference_generate, token_ids, worker

    python_path, python_ops = [], []
    compact_host = attention._compact_host
    route, attend = MoDLlamaDecoderLayer.route, MoDLlamaDecoderLayer.attend

    def recording(step, *args):
        python_path.append(step.is_decode)
        return compact_host(step, *args)

    def recording_route(self, g):
        python_ops.append(("route", self.routing_state.step is not None))
        return route(self, g)

    def recording_attend(self, q, k, v, idx):
        python_ops.append(("attend", self.routing_state.step is not None))
        return attend(self, q, k, v, idx)

    monkeypatch.setattr(attention, "_compact_host", recording)
    if mode == "python-attention":
        monkeypatch.setattr(cpu_decode, "bind", lambda kernels, builder: None)
    monkeypatch.setattr(MoDLlamaDecoderLayer, "route", recording_route)
    monkeypatch.setattr(MoDLlamaDecoderLayer, "attend", recording_attend)
    model_dir = small_mod_dir(tmp_path / "m", [0, 2, 3, 5])
    prompts = random_prompts()
    want, want_routed = reference_generate(model_dir, prompts, MAX_TOKENS)
    with inproc_llm(str(model_dir), skip_tokenizer_init=True, max_model_len=512,
                    **(COMPILED if mode != "eager" else {})) as llm:
        got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(MAX_TOKENS)))
        stats = llm.collective_rpc("mod_kv_stats")[0]
        model = worker(llm).model_runner.model
        bound = [m.mod_cpu_kernels for m in model.modules() if hasattr(m, "mod_cpu_kernels")]
    assert got == want
    assert {int(layer): n for layer, n in stats["routed_tokens"].items()} == want_routed
    if mode == "python-attention":
        assert len(bound) == 4 and all(kernels and kernels.compact is None for kernels in bound)
        assert False in python_path and True in python_path  # prefill and decode steps
        return
    assert len(bound) == 4 and all(kernels and kernels.compact is not None for kernels in bound)
    assert not python_path
    if mode == "compiled":  # warm-up runs (no step) take the Python ops; real steps only to bind
        assert ("route", False) in python_ops and ("route", True) not in python_ops
        assert python_ops.count(("attend", True)) == 4
    else:  # eager: the whole routed layer is one Python op, which never calls these two
        assert not python_ops
