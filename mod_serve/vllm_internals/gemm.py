"""GEMM seam: a routed layer's linear layers must take zero rows.

A routed layer's linears see only the tokens routed into it, and in a step where every token
skips the layer (or in vLLM's warm-up runs, which route nothing) that is none. vLLM's CPU
dispatch (``dispatch_cpu_unquantized_gemm``) sends small bf16/fp16 weights (at most 1 MiB) to
sgl-kernel's ``weight_packed_linear`` on CPUs with AMX, and that kernel divides by the row
count: an empty input kills the engine with SIGFPE (SmolLM2-135M's ``o_proj`` in bf16 on an
AMX Xeon, at a compiled engine's start-up; the eager routed layer returns before its GEMMs when
nothing is routed). vLLM's dense models never multiply zero rows, so only routed layers
need another path: there the dispatch skips sgl-kernel and takes the path vLLM uses for every
larger weight (oneDNN's ``onednn_mm``, which returns an empty output for an empty input, or
``torch.nn.functional.linear``). Everything else about the dispatch is vLLM's.

oneDNN builds a primitive per row count (1-8 ms each here; vLLM keeps 32 per weight), and a
routed layer's row count is new in nearly every prefill step: its routed tokens. So where the C++
routed ops are built (``cpu_decode``), a routed layer's oneDNN linear runs
``mod_serve::onednn_mm_rows`` (``routed_linear.cpp``): vLLM's same ``_C::onednn_mm`` and handler
over row pieces of a few fixed sizes (the powers of two >= 64 in the count, then the rest padded to
at most 64), and the worker's warm-up (``warm_up``) builds each size's primitive ahead, so that no
prefill step builds one. Its outputs of 1 MiB or more come from a few reused buffers
(``routed_linear.cpp``): a routed GEMM's output is new memory in every step, and glibc faults a
freed 48 MiB one (gate_up at 8192 rows) in again page by page.
"""

from __future__ import annotations

import functools
from unittest import mock

import torch
from torch import nn
from vllm.model_executor.layers import utils as layer_utils
from vllm.model_executor.layers.linear import UnquantizedLinearMethod


class AnyRowsLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method, dispatched on the CPU without sgl-kernel's GEMM; where it
    lands on oneDNN and the C++ routed ops are built, the rows go in pieces of a few fixed sizes."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        handlers = []
        create = layer_utils.ops.create_onednn_mm

        def create_and_keep(weight, cache_size):
            handlers.append(create(weight, cache_size))
            return handlers[-1]

        with mock.patch.object(layer_utils, "check_cpu_sgl_kernel", return_value=False), \
                mock.patch.object(layer_utils.ops, "create_onednn_mm", create_and_keep):
            super().process_weights_after_loading(layer)
        if handlers and row_pieces_op():
            handler = layer.routed_onednn = handlers[-1]
            layer.cpu_linear = lambda x, weight, bias: torch.ops.mod_serve.onednn_mm_rows(
                x, bias, handler.handler_tensor, handler.n)


@functools.cache
def row_pieces_op() -> bool:
    """Whether ``mod_serve::onednn_mm_rows`` is loaded (the C++ routed ops; its fake registered)."""
    from . import cpu_decode

    if cpu_decode.extension() is None:
        return False
    torch.library.register_fake("mod_serve::onednn_mm_rows")(
        lambda x, bias, handler, n: x.new_empty((*x.shape[:-1], n)))
    return True


def piece_sizes(max_rows: int) -> list[int]:
    """Every GEMM size ``onednn_mm_rows`` runs for row counts up to ``max_rows``."""
    counts = [*range(1, 64), *(1 << b for b in range(6, max(max_rows, 1).bit_length()))]
    return sorted({p for rows in counts for p in torch.ops.mod_serve.row_pieces(rows)})


def warm_up(module: nn.Module, max_rows: int) -> int:
    """Build the oneDNN primitive of every piece size up to ``max_rows`` (the step's token budget)
    in each routed linear under ``module``, as vLLM's warm-up runs its dense shapes ahead; returns
    how many GEMMs ran. Inputs are zeros; outputs are dropped."""
    layers = [m for m in module.modules() if hasattr(m, "routed_onednn")]
    if not layers:
        return 0
    sizes = piece_sizes(max_rows)
    ran = 0
    for m in layers:
        h = m.routed_onednn
        x = torch.zeros(sizes[-1], h.k, dtype=m.weight.dtype)  # vLLM may empty it; it keeps its dtype
        out = x.new_empty(sizes[-1], h.n)
        for rows in sizes:
            torch.ops._C.onednn_mm(out[:rows], x[:rows], None, h.handler_tensor)
            ran += 1
    return ran


def accept_empty_inputs(module: nn.Module) -> None:
    """Give every unquantized linear layer under ``module`` the method above (quantized methods
    keep theirs: vLLM's CPU quantized GEMMs are not routed here)."""
    for m in module.modules():
        if type(getattr(m, "quant_method", None)) is UnquantizedLinearMethod:
            m.quant_method = AnyRowsLinearMethod()
