"""CPU seam: a routed layer's decision and attention in C++ (``cpu_decode.cpp``).

On the CPU a routed layer's attention is the compact slots and metadata of its routed tokens,
then vLLM's two CPU attention kernels. ``attention`` does this in numpy and Python
(``_compact_host``, ``_metadata``, ``CpuAttentionKernels``), about 20 Python operations per routed
layer and step, each ~10-50 us here once a layer's weights have streamed through the caches.
``RoutedAttention`` does the same in one call, in any step (prefill, decode, mixed): the same
slots, the same ``query_start_loc``/``seq_lens``, vLLM's own scheduler-metadata op and kernels
(found by name through the dispatcher), with the layer's constant arguments bound once.

The compiled graph goes further: it calls ``mod_serve::route_cpu`` and
``mod_serve::routed_attention_cpu``, C++ twins of the Python ops in ``routed_op``. Told once per
step what the step is (``RoutingState.begin``: ``set_step``), they decide ``g >= p`` (float32, as
torch does) when the step has one threshold and no TP broadcast (keeping each layer's indices
for the prefix cache's boundary log, ``take_routed_log``), and attend through the layer's
``RoutedAttention`` (registered by op name at its first Python call, ``bind_layer``); any other
case they hand to the Python op. vLLM 0.32 binds a layer's CPU KV cache once per engine, so a
bound call never sees its cache replaced.

The same extension carries ``routed_linear.cpp``: routed layers' oneDNN GEMMs in row pieces of a
few fixed sizes (see ``gemm``), and the few reused buffers that hold the routed GEMMs' and
attention's large outputs.

The extension is built with torch's C++ extension loader at the first engine start (~45 s here, then
cached under ``~/.cache/torch_extensions``; ``make install`` builds it ahead). Where it cannot be
built (no C++ compiler) or ``MOD_SERVE_CPU_DECODE=0``, routed layers keep the Python path, which
computes the same thing (``tests/test_vllm_cpu_decode.py`` checks the two against each other).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name("cpu_decode.cpp"), Path(__file__).with_name("routed_linear.cpp")]


@functools.cache
def extension():
    """The built extension module, or None (switched off, or it cannot be built here)."""
    if os.environ.get("MOD_SERVE_CPU_DECODE", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="mod_serve_cpu_decode", sources=[str(s) for s in SOURCES], extra_cflags=["-O2"], verbose=False)
    except Exception as exc:  # no compiler, no headers: the Python path computes the same
        logger.warning("mod-serve: C++ routed ops unavailable (%s); routed layers use the Python path", exc)
        return None


def bind(kernels, builder):
    """The C++ attention of one routed layer, from its bound ``CpuAttentionKernels`` and its
    KV cache group's CPU metadata builder; None if unavailable."""
    import torch
    from vllm import envs

    ext = extension()
    if ext is None:
        return None
    (hq, dq), (hk, dk), (hv, dv) = kernels.shape
    if hv != hk:
        return None
    return ext.RoutedAttention(
        kernels.key_cache, kernels.value_cache,
        [hq, hk, dk, dv, builder.block_size],
        [kernels.scale, kernels.k_scale, kernels.v_scale, kernels.softcap],
        kernels.sliding_window, kernels.isa, kernels.dtype, kernels.alibi_slopes, kernels.sinks,
        [builder.num_heads, builder.num_kv_heads, builder.head_dim, builder.window_size],
        torch.empty(0, dtype=builder.dtype), builder.isa, builder.kv_cache_dtype, bool(envs.VLLM_CPU_ATTN_SPLIT_KV),
    )


def build() -> None:
    """``make install``: build the extension ahead of the first engine start."""
    logging.basicConfig(level=logging.INFO)
    print("mod-serve C++ routed ops:", "built" if extension() is not None else "unavailable (Python path)")
