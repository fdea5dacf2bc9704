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
"""

from __future__ import annotations

from unittest import mock

from torch import nn
from vllm.model_executor.layers import utils as layer_utils
from vllm.model_executor.layers.linear import UnquantizedLinearMethod


class AnyRowsLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method, dispatched on the CPU without sgl-kernel's GEMM."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        with mock.patch.object(layer_utils, "check_cpu_sgl_kernel", return_value=False):
            super().process_weights_after_loading(layer)


def accept_empty_inputs(module: nn.Module) -> None:
    """Give every unquantized linear layer under ``module`` the method above (quantized methods
    keep theirs: vLLM's CPU quantized GEMMs are not routed here)."""
    for m in module.modules():
        if type(getattr(m, "quant_method", None)) is UnquantizedLinearMethod:
            m.quant_method = AnyRowsLinearMethod()
