"""Routed layers' linear layers take zero rows (``mod_serve.vllm_internals.gemm``): a routed layer
sees only its routed tokens, maybe none, and vLLM's sgl-kernel GEMM (small bf16 weights on AMX
CPUs) dies with SIGFPE on an empty input."""

from __future__ import annotations

import concurrent.futures
from unittest import mock

import pytest
import torch
from torch import nn
from vllm import SamplingParams
from vllm.model_executor.layers import utils as layer_utils
from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from mod_serve.vllm_internals.gemm import AnyRowsLinearMethod
from tests.test_vllm_layouts import MAX_TOKENS, random_prompts, small_mod_dir
from tests.vllm_helpers import COMPILED, inproc_llm, worker


def _linear(n=64, k=128, dtype=torch.bfloat16):
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(dtype),
                                requires_grad=False)
    layer.bias = None
    return layer


def test_routed_linears_skip_sgl_kernel_and_take_zero_rows():
    """Where vLLM would pick sgl-kernel's GEMM (as on an AMX CPU, simulated), a routed layer's
    linear takes vLLM's next path, which returns an empty output for an empty input and the
    product for any other."""
    layer = _linear()
    weight = layer.weight.detach().float().clone()
    with mock.patch.object(layer_utils, "check_cpu_sgl_kernel", return_value=True), \
            mock.patch.object(layer_utils.ops, "weight_packed_linear_cpu", side_effect=AssertionError("sgl-kernel GEMM")):
        AnyRowsLinearMethod().process_weights_after_loading(layer)
        assert layer.weight.numel() == 0  # vLLM's dispatch ran (it drops the unpacked weight)
        assert layer.cpu_linear(torch.empty(0, 128, dtype=torch.bfloat16), None, None).shape == (0, 64)
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        got = layer.cpu_linear(x, None, None)
        assert layer_utils.check_cpu_sgl_kernel(64, 128, torch.bfloat16) is True  # vLLM's choice restored
    torch.testing.assert_close(got.float(), x.float() @ weight.t(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_linears_run_rows_in_a_few_piece_sizes(dtype):
    """oneDNN builds a primitive per row count and vLLM keeps 32 per weight; a routed layer's row
    count is its routed tokens, new in nearly every prefill. Its linear runs the rows in pieces:
    the powers of two >= 64 of the count, then the rest padded to at most 64 rows (as it is up to
    8): 18 sizes up to 8192, all built by ``warm_up``; the result is x @ W.T for every count."""
    from mod_serve.vllm_internals import gemm

    if not layer_utils.ops._supports_onednn or not gemm.row_pieces_op():
        pytest.skip("no oneDNN GEMM or no C++ routed ops here")
    if dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("bf16 oneDNN GEMMs need AVX-512 BF16")
    pieces = {rows: torch.ops.mod_serve.row_pieces(rows) for rows in range(1, 8193)}
    assert all(rows <= sum(p) <= rows + 31 and len(p) <= 8 for rows, p in pieces.items())
    assert pieces[5] == [5] and pieces[777] == [512, 256, 16] and pieces[8191][-1] == 64
    sizes = {s for p in pieces.values() for s in p}
    assert sorted(sizes) == gemm.piece_sizes(8192) and len(sizes) == 18
    layer = _linear(n=96, k=64, dtype=dtype)
    weight = layer.weight.detach().double().clone()
    with mock.patch.object(layer_utils, "check_cpu_sgl_kernel", return_value=False):
        AnyRowsLinearMethod().process_weights_after_loading(layer)
    module = nn.Sequential(layer)
    assert gemm.warm_up(module, 300) == len(gemm.piece_sizes(300)) == 8 + 2 + 3  # 1-8, 16, 32, 64-256
    for rows in (0, 1, 5, 8, 9, 13, 17, 33, 63, 64, 65, 100, 513, 777):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(dtype)
        got = layer.cpu_linear(x, layer.weight, None)
        assert got.shape == (rows, 96) and got.is_contiguous()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got.double(), x.double() @ weight.t(), rtol=tol, atol=tol)


def test_routed_linears_reuse_large_outputs_once_free():
    """A routed GEMM's output of 1 MiB or more comes from a few buffers kept per thread (a fresh
    48 MiB gate_up output at 8192 rows is faulted in page by page, ~35 ms a call here): once the
    last view of an output is gone its memory is handed out again, never while any view lives;
    every product is x @ W.T whatever buffer it lands in; small outputs are plain allocations."""
    from mod_serve.vllm_internals import gemm

    if not layer_utils.ops._supports_onednn or not gemm.row_pieces_op():
        pytest.skip("no oneDNN GEMM or no C++ routed ops here")
    layer = _linear(n=1024, k=64, dtype=torch.float32)
    weight = layer.weight.detach().double().clone()
    with mock.patch.object(layer_utils, "check_cpu_sgl_kernel", return_value=False):
        AnyRowsLinearMethod().process_weights_after_loading(layer)

    def run(rows, seed):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed))
        out = layer.cpu_linear(x, layer.weight, None)
        torch.testing.assert_close(out.double(), x.double() @ weight.t(), rtol=1e-4, atol=1e-4)
        return out

    def scenario():  # in a new thread: its own, empty pool (the buffers are kept per thread)
        first = run(700, 0)  # 2.7 MiB
        ptr = first.data_ptr()
        view = first[3:]  # a view keeps the memory taken
        del first
        second = run(600, 1)
        assert second.data_ptr() != ptr
        del view
        decoy = torch.empty(650, 1024)  # the pool still owns the first's memory: not malloc's to give
        assert decoy.data_ptr() != ptr
        third = run(650, 2)  # fits the first's buffer, now free
        assert third.data_ptr() == ptr and third.shape == (650, 1024) and third.is_contiguous()
        held = [run(300, 3 + i) for i in range(5)]  # more live outputs than buffers: still right
        assert len({t.data_ptr() for t in [second, third, *held]}) == 7
        pooled = {t.data_ptr() for t in [second, third, *held[:2]]}  # the pool's 4 buffers
        del second, third, held
        assert run(200, 9).data_ptr() not in pooled  # 0.8 MiB: a plain allocation, though all 4 are free
        assert run(400, 10).data_ptr() in pooled

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(scenario).result()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(),
                    reason="bf16 is the bench's dtype only on CPUs with AVX-512 BF16 (float32 elsewhere)")
@pytest.mark.parametrize("mode", ["compiled", "eager"])
def test_bf16_engine_with_layers_that_route_nothing(mode, tmp_path):
    """A checkpoint's dtype (bf16) as ``mod-serve bench`` and ``serve --no-enforce-eager`` run it on
    a CPU with AVX-512 BF16: compiled (and eager, serve's default). vLLM's warm-up routes nothing, and at p = 1 no token enters any routed layer in any
    step; the engine serves both that request and one at the checkpoint's p. Only routed layers
    changed their GEMM path; the others keep vLLM's."""
    model_dir = small_mod_dir(tmp_path / "m", [1, 2, 3, 5])
    prompts = random_prompts(n=2, seed=3)
    with inproc_llm(str(model_dir), dtype="bfloat16", skip_tokenizer_init=True, max_model_len=512,
                    **(COMPILED if mode == "compiled" else {})) as llm:
        model = worker(llm).model_runner.model
        methods = {i: {type(m.quant_method) for m in layer.modules() if hasattr(m, "quant_method")}
                   for i, layer in enumerate(model.model.layers)}
        assert all(methods[i] == ({AnyRowsLinearMethod} if i in (1, 2, 3, 5) else {UnquantizedLinearMethod})
                   for i in methods), methods
        state = model.routing_state

        def generate(p):
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                    extra_args=None if p is None else {"mod_threshold": p})
            before = state.totals_routed.copy()
            outs = llm.generate([{"prompt_token_ids": q} for q in prompts], params)
            assert [len(o.outputs[0].token_ids) for o in outs] == [MAX_TOKENS] * len(prompts)
            return state.totals_routed - before

        assert generate(1.0).tolist() == [0, 0, 0, 0]  # every step, every routed layer: zero rows
        routed = generate(None)
        tokens = sum(len(q) + MAX_TOKENS - 1 for q in prompts)
        assert all(0 < n < tokens for n in routed.tolist()), routed
