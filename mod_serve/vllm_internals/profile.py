"""Bench seam: what a dense step's time is made of, for the bench's CPU-time ideal.

The CPU-time ideal (``mod_serve.time_ideal``) asks what a MoD model would take if routing cost
nothing: the dense step, less what each routed layer skips. That needs two things measured on the
machine, with vLLM's own code:

* ``StepTimers``: while active, the time of vLLM's Llama forward (every decoder layer; the LM head,
  sampling and the scheduler are outside it) and of its CPU attention kernels (the CPU backend
  impl's ``forward`` and KV cache write), summed over a step;
* ``linear_seconds``: one decoder layer's linears at 1, 2, ... rows through vLLM's CPU GEMM
  dispatch (the path the dense engine's layers took), cycling over one weight set per layer so the
  weights stream from memory as a decode step's do. A batch-8 decode step's GEMMs are weight-bandwidth
  bound: a routed layer with 4 of 8 tokens routed in costs nearly what it costs with 8, and this
  curve says how nearly.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


class StepTimers:
    """``with StepTimers() as t: engine.step()``: ``t.forward_s``, ``t.attention_s`` (seconds in the
    Llama forward and in the attention kernels, all layers), ``t.attention_calls``. Patches the
    classes while active and restores them on exit."""

    def __init__(self) -> None:
        self.forward_s = 0.0
        self.attention_s = 0.0
        self.attention_calls = 0
        self._saved: list[tuple[type, str, object]] = []

    def reset(self) -> None:
        self.forward_s = self.attention_s = 0.0
        self.attention_calls = 0

    def _wrap(self, owner: type, attr: str, field: str, count: bool = False) -> None:
        fn = owner.__dict__[attr]
        timers = self

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(timers, field, getattr(timers, field) + time.perf_counter() - t)
                if count:
                    timers.attention_calls += 1

        self._saved.append((owner, attr, fn))
        setattr(owner, attr, timed)

    def __enter__(self) -> StepTimers:
        from vllm.model_executor.models.llama import LlamaForCausalLM

        self._wrap(LlamaForCausalLM, "forward", "forward_s")
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl  # the bench runs on the CPU

        self._wrap(CPUAttentionBackendImpl, "forward", "attention_s", count=True)
        self._wrap(CPUAttentionBackendImpl, "do_kv_cache_update", "attention_s")
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)
        self._saved.clear()


def linear_seconds(shapes: list[tuple[int, int]], num_layers: int, dtype: torch.dtype, max_rows: int,
                   sweeps: int = 5) -> list[float]:
    """Seconds one decoder layer's linears (``shapes``: (out, in) of each) take at 0, 1, ...,
    ``max_rows`` rows on the CPU, through vLLM's CPU GEMM dispatch: the median over ``sweeps`` of a
    sweep over ``num_layers`` weight sets (random, one per layer, so that they stream from memory
    as a step's do), divided by ``num_layers``. Entry 0 is 0 (a layer no token enters costs nothing
    in the ideal)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layers = []
    for _ in range(num_layers):
        for n, k in shapes:
            m = nn.Module()
            m.weight = nn.Parameter(torch.randn(n, k, dtype=dtype) * 0.02, requires_grad=False)
            dispatch_cpu_unquantized_gemm(m, remove_weight=False)
            layers.append(m)
    inputs = {k: [torch.randn(rows, k, dtype=dtype) for rows in range(max_rows + 1)] for _, k in shapes}
    out = [0.0]
    for rows in range(1, max_rows + 1):
        times = []
        for _ in range(sweeps + 1):  # the first sweep warms up
            t = time.perf_counter()
            for m in layers:
                m.cpu_linear(inputs[m.weight.shape[1]][rows], m.weight, None)
            times.append(time.perf_counter() - t)
        out.append(statistics.median(times[1:]) / num_layers)
    return out


def llama_linear_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of a Llama decoder layer's fused linears as vLLM builds them: qkv, o, gate_up, down."""
    h, f = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)]
