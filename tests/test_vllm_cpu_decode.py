"""A routed layer's decode-step attention as one C++ call (``mod_serve.vllm_internals.cpu_decode``).

Checked against a plain PyTorch computation of the same thing: the compact slots (``block_table[r,
c // B] * B + c % B`` with ``c = prior[r]``), the routed tokens' attention over their requests'
compact sequences, and the layer's new counts; then in a real engine (CPU, float32, compiled and
eager), where decode steps must take the C++ call and still serve token for token like the
reference model."""

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("routed_rows", [[0, 1, 2, 3, 4], [1, 3, 4], [2]])
def test_decode_attention_matches_plain_pytorch(routed_rows, dtype):
    ext = cpu_decode.extension()
    assert ext is not None, "the C++ decode attention must build here (g++ and torch's headers)"
    g = torch.Generator().manual_seed(len(routed_rows))
    isa = _isa(dtype)
    prior = torch.tensor([0, 5, 15, 16, 40], dtype=torch.int64)  # empty, mid-block, block ends, 3rd block
    reqs, num_blocks = prior.numel(), 32
    # rows past num_reqs (the runner's table has max_num_reqs rows) must be ignored
    block_table = torch.randperm(num_blocks, generator=g)[: (reqs + 2) * 4].view(reqs + 2, 4).to(torch.int32)
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

    n = len(routed_rows)
    q = torch.randn(n, HQ * D, generator=g).to(dtype)
    qkv = torch.randn(n, 2 * HK * D + 8, generator=g).to(dtype)  # k, v as strided views, as in the graph
    k, v = qkv[:, : HK * D], qkv[:, HK * D: 2 * HK * D]
    idx = torch.tensor(routed_rows, dtype=torch.int64)
    new = torch.zeros(reqs, dtype=torch.int64)
    want_k, want_v = key_cache.clone(), value_cache.clone()
    _write(k.reshape(n, HK, D), v.reshape(n, HK, D), want_k, want_v,
           torch.tensor([slot(r, int(prior[r])) for r in routed_rows], dtype=torch.int64), isa)

    op = ext.DecodeAttention(key_cache, value_cache, [HQ, HK, D, D, B], [D ** -0.5, 1.0, 1.0, 0.0], -1, isa, "auto",
                             None, None, [HQ, HK, D, -1], torch.empty(0, dtype=dtype), isa, "auto", False)
    out = op(q, k, v, idx, prior, new, block_table)

    assert new.tolist() == [int(r in routed_rows) for r in range(reqs)]
    assert torch.equal(key_cache, want_k) and torch.equal(value_cache, want_v)  # only the routed slots written
    assert out.shape == (n, HQ * D)
    for j, r in enumerate(routed_rows):  # attention over the request's compact sequence, then the new token
        keys = torch.cat([ctx_k[r], k[j].view(1, HK, D)]).float().repeat_interleave(HQ // HK, dim=1)
        values = torch.cat([ctx_v[r], v[j].view(1, HK, D)]).float().repeat_interleave(HQ // HK, dim=1)
        scores = torch.einsum("hd,thd->ht", q[j].view(HQ, D).float(), keys) * D ** -0.5
        want = torch.einsum("ht,thd->hd", scores.softmax(-1), values).reshape(-1)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[j].float(), want, rtol=tol, atol=tol)


def test_decode_attention_refuses_rows_out_of_order():
    ext = cpu_decode.extension()
    key_cache, value_cache = _caches(4, torch.float32)
    isa = _isa(torch.float32)
    op = ext.DecodeAttention(key_cache, value_cache, [HQ, HK, D, D, B], [D ** -0.5, 1.0, 1.0, 0.0], -1, isa, "auto",
                             None, None, [HQ, HK, D, -1], torch.empty(0), isa, "auto", False)
    q, kv = torch.zeros(2, HQ * D), torch.zeros(2, HK * D)
    table = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="bad routed rows"):
        op(q, kv, kv, torch.tensor([1, 0]), torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), table)


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
            ext.set_step(True, p, tokens, False, empty, empty, [])
            got = route(g, name, in_cpp=True)
            assert torch.equal(got, (g[:tokens] >= p).nonzero().squeeze(-1)), (p, tokens)
        ext.set_step(True, 0.7, 40, False, empty, empty, [])
        assert {3, 9} <= set(route(g, name, in_cpp=True).tolist())
        assert not layer.calls
        ext.set_step(False, 0.0, 40, False, empty, empty, [])  # e.g. per-request thresholds
        assert route(g, name, in_cpp=True).tolist() == [-1] and len(layer.calls) == 1
        ext.clear_step()
        assert route(g, name, in_cpp=True).tolist() == [-1] and len(layer.calls) == 2
    finally:
        ext.clear_step()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compiled", "eager"])
def test_engine_decode_steps_take_the_cpp_call(mode, tmp_path, monkeypatch):
    """Decode steps of every routed layer go through the C++ call (the Python compaction then runs
    for prefill steps only); compiled, the graph's C++ ops decide every step with one threshold and
    no prefix-cache boundary, and attend in every decode step (a prefill step binds each layer).
    The engine still serves like the reference model: greedy tokens and per-layer routed counts."""
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
        step = self.routing_state.step
        python_ops.append(("route", step is not None and step.crossings is None))
        return route(self, g)

    def recording_attend(self, q, k, v, idx):
        step = self.routing_state.step
        python_ops.append(("attend", step is not None and step.is_decode))
        return attend(self, q, k, v, idx)

    monkeypatch.setattr(attention, "_compact_host", recording)
    monkeypatch.setattr(MoDLlamaDecoderLayer, "route", recording_route)
    monkeypatch.setattr(MoDLlamaDecoderLayer, "attend", recording_attend)
    model_dir = small_mod_dir(tmp_path / "m", [0, 2, 3, 5])
    prompts = random_prompts()
    want, want_routed = reference_generate(model_dir, prompts, MAX_TOKENS)
    with inproc_llm(str(model_dir), skip_tokenizer_init=True, max_model_len=512,
                    **(COMPILED if mode == "compiled" else {})) as llm:
        got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(MAX_TOKENS)))
        stats = llm.collective_rpc("mod_kv_stats")[0]
        model = worker(llm).model_runner.model
        bound = [m.mod_cpu_kernels for m in model.modules() if hasattr(m, "mod_cpu_kernels")]
    assert got == want
    assert {int(layer): n for layer, n in stats["routed_tokens"].items()} == want_routed
    assert len(bound) == 4 and all(kernels and kernels.decode is not None for kernels in bound)
    assert python_path and not any(python_path)  # prefill steps only
    if mode == "compiled":
        assert ("route", False) in python_ops and ("route", True) not in python_ops
        # prefill steps bind each layer's C++ call; every decode step then attends without Python
        assert ("attend", False) in python_ops and ("attend", True) not in python_ops
    else:  # eager: the whole routed layer is one Python op, which never calls these two
        assert not python_ops
