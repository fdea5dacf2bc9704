"""Compile seam: the custom ops a routed layer runs eagerly, compiled or not.

vLLM compiles the MoD model like its dense Llama (``@support_torch_compile``). Traced, a routed
layer (``MoDLlamaDecoderLayer.run_routed_graph``) is graph ops around two opaque steps that depend
on data: ``mod_serve::route`` (the decision ``g >= p`` and the step's bookkeeping; its output size,
the routed count, is an unbacked symbol) and ``mod_serve::routed_attention`` (attention of the
routed tokens over the layer's compact KV cache). Everything else (float32 router, gather, norms,
GEMMs, RoPE, MLP, gated update, scatter) is fused by inductor as in the dense layers.

On the CPU the graph calls their C++ twins (``route_cpu``, ``routed_attention_cpu``, built from
``cpu_decode.cpp``), which decide and, in decode steps, attend without entering Python, and call
the Python op in any other step.

Eager (``enforce_eager``; always on CUDA), the whole routed layer is one op,
``mod_serve::routed_layer``, whose body calls vLLM's C++ kernels directly on the CPU (RMSNorm, fused
add + RMSNorm, SiLU-and-mul, RoPE): vLLM's modules in their native PyTorch forms cost ~10x more
when run eagerly. Each op finds its layer by name (a string baked into the graph).
"""

from __future__ import annotations

import functools
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


# ---- the routed layer inside the compiled graph ----------------------------------------------
# Compiled, only the two data-dependent steps stay opaque: ``route`` (the decision ``g >= p`` and
# the per-step bookkeeping; its output size is an unbacked symbol) and ``routed_attention``
# (attention of the routed tokens over the layer's compact KV cache). The float32 router, gather,
# norms, GEMMs, RoPE, MLP, gated update and scatter are graph ops that inductor fuses as it fuses
# the dense layers.
def _route(g: torch.Tensor, layer_name: str) -> torch.Tensor:
    return _LAYERS[layer_name].route(g)


def _route_fake(g: torch.Tensor, layer_name: str) -> torch.Tensor:
    return g.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, layer_name: str) -> torch.Tensor:
    return _LAYERS[layer_name].attend(q, k, v, idx)


def _attend_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, layer_name: str):
    attn = _LAYERS[layer_name].self_attn.attn
    return q.new_empty(q.shape[0], attn.num_heads * attn.head_size_v)


direct_register_custom_op("route", _route, mutates_args=[], fake_impl=_route_fake, target_lib=_lib)
direct_register_custom_op("routed_attention", _attend, mutates_args=[], fake_impl=_attend_fake, target_lib=_lib)


@functools.cache
def cpu_ops() -> bool:
    """Whether the C++ twins of ``route`` and ``routed_attention`` are loaded (``cpu_decode``):
    the same ops, which run the common step without entering Python and call the Python op for
    any other. Asked when a routed layer is built on the CPU, never while tracing."""
    from . import cpu_decode

    if cpu_decode.extension() is None:
        return False
    torch.library.register_fake("mod_serve::route_cpu")(_route_fake)
    torch.library.register_fake("mod_serve::routed_attention_cpu")(_attend_fake)
    return True


def route(g: torch.Tensor, layer_name: str, in_cpp: bool = False) -> torch.Tensor:
    """Indices of the tokens routed in, from the float32 gates (sink positions already at 1)."""
    if in_cpp:
        return torch.ops.mod_serve.route_cpu(g, layer_name)
    return torch.ops.mod_serve.route(g, layer_name)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, layer_name: str,
           in_cpp: bool = False) -> torch.Tensor:
    if in_cpp:
        return torch.ops.mod_serve.routed_attention_cpu(q, k, v, idx, layer_name)
    return torch.ops.mod_serve.routed_attention(q, k, v, idx, layer_name)


def rotary_graph(rope, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, num_heads: int, num_kv_heads: int):
    """vLLM's native RoPE (``RotaryEmbedding.forward_static``) with the head counts spelled out:
    its ``view(num_tokens, -1, head_size)`` cannot infer -1 when the routed count may be 0."""
    from vllm.model_executor.layers.rotary_embedding.common import ApplyRotaryEmb

    cos, sin = rope._match_cos_sin_cache_dtype(q).index_select(0, positions).chunk(2, dim=-1)
    head, rot = rope.head_size, rope.rotary_dim

    def apply(x, heads):
        x = x.unflatten(-1, (heads, head))
        x_rot = ApplyRotaryEmb.forward_static(x[..., :rot], cos, sin, rope.is_neox_style)
        return torch.cat((x_rot, x[..., rot:]), dim=-1).flatten(-2)

    return apply(q, num_heads), apply(k, num_kv_heads)


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
