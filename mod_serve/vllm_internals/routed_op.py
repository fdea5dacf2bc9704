"""Compile seam: each routed layer is one opaque custom op inside vLLM's compiled model graph.

vLLM compiles the MoD model like its dense Llama (``@support_torch_compile``): embedding,
unrouted layers and the final norm become inductor kernels. What a routed layer does depends on
data (how many tokens its router lets in), so the whole routed layer (router, routing decision,
gather, layer on the routed tokens over its compact KV cache, gated update, scatter) runs eagerly
behind ``torch.ops.mod_serve.routed_layer``, whose shape contract is simply "same shape as the
hidden states". The op finds its layer by name (a string baked into the graph).

The layer body inside the op calls vLLM's C++ kernels directly on the CPU (RMSNorm, fused
add + RMSNorm, SiLU-and-mul, RoPE): in compiled mode vLLM's modules use their native PyTorch
forms, which inductor fuses in the dense layers but which cost ~10x more when run eagerly.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch.library import Library
from vllm.utils.torch_utils import direct_register_custom_op

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_ids = itertools.count()
_lib = Library("mod_serve", "FRAGMENT")


def register_routed_layer(layer, prefix: str) -> str:
    """A process-unique name for ``layer`` (one process may build several engines)."""
    name = f"{prefix}#{next(_ids)}"
    _LAYERS[name] = layer
    return name


def _routed_layer(hidden: torch.Tensor, positions: torch.Tensor, layer_name: str) -> torch.Tensor:
    return _LAYERS[layer_name].run_routed(hidden, positions)


def _routed_layer_fake(hidden: torch.Tensor, positions: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden)


direct_register_custom_op("routed_layer", _routed_layer, mutates_args=[], fake_impl=_routed_layer_fake,
                          target_lib=_lib)


def routed_layer(hidden: torch.Tensor, positions: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.ops.mod_serve.routed_layer(hidden, positions, layer_name)


# ---- eager kernels for the layer body inside the op ------------------------------------------
def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        return norm(x)
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, norm.weight, norm.variance_epsilon)
    return out


def add_rms_norm(norm, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); ``x`` and ``residual`` are overwritten on the CPU."""
    if x.device.type != "cpu":
        return norm(x, residual)
    torch.ops._C.fused_add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
    return x, residual


def silu_and_mul(act, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        return act(x)
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    torch.ops._C.silu_and_mul(out, x)
    return out


def rotary(rope, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    return rope.forward_cpu(positions, q, k) if q.device.type == "cpu" else rope(positions, q, k)
