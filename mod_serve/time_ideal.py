"""The CPU-time ideal: how fast a MoD model would be on this machine if routing cost nothing.

``mod-serve bench``'s MAC ideal (``bench.ideal_speedup``) counts multiply-adds. On a CPU a decode
step's time does not follow them: at batch 8 a layer's GEMMs read all of its weights unless all 8
tokens skip it, so they barely shrink when half the tokens do, and the attention kernel costs more
per MAC than the bandwidth-bound GEMMs. The issue's ideal (shared/notes/mod-speed.md, section 5) is
a time: the dense model's compiled step with zero routing overhead, a routed layer skipped at its
measured routed fraction, attention over the compact caches. Measured per case on the dense engine
of the same run:

* the dense step's time ``S``, the time of its decoder layers ``F`` (vLLM's Llama forward) and of
  its attention kernels ``A`` (all layers), for the prefill steps and for the decode steps
  (``dense_profile``);
* one layer's linears at 1..B rows through vLLM's CPU GEMM dispatch (``linear_curve``), ``lin``.

Then, per layer, ``body = (F - A) / L`` (GEMMs, norms, rotary, activation) and ``att = A / L``.
Routed layer ``i`` with routed fraction ``r`` saves ``body * (1 - E[lin(n)] / lin(B))`` with ``n ~
Binomial(B, r)`` the tokens of a batch-``B`` decode step routed into it (``lin(0) = 0``; in a
prefill step, whose thousands of rows make GEMMs compute bound, ``E[lin(n)] / lin(B) = r``), and
``att * (1 - r^2)`` (a token routed in attends to the ``r`` of the context routed in before it).
The LM head, sampling and scheduling are never saved. Ideal speed-up: ``S / (S - saved)``.
"""

from __future__ import annotations

import math
import time


def dense_profile(llm, prompts: list[list[int]], decode_tokens: int, params) -> dict:
    """One more run of a case on the dense engine, timed inside: for the prefill steps (until every
    request has its first token) and the decode steps after them, the summed step time, Llama
    forward time and attention kernel time, the attention calls and the step count."""
    from .vllm_internals.profile import StepTimers

    engine = llm.llm_engine
    phases = {p: {"steps": 0, "step_s": 0.0, "forward_s": 0.0, "attention_s": 0.0, "attention_calls": 0}
              for p in ("prefill", "decode")}
    tag = f"profile-{len(prompts)}x{len(prompts[0])}-{time.monotonic_ns()}"
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params(decode_tokens))
    started: set[str] = set()
    with StepTimers() as timers:
        while engine.has_unfinished_requests():
            phase = "prefill" if len(started) < len(prompts) else "decode"
            timers.reset()
            t = time.perf_counter()
            outs = engine.step()
            total = time.perf_counter() - t
            started.update(o.request_id for o in outs if o.outputs[0].token_ids)
            acc = phases[phase]
            acc["steps"] += 1
            acc["step_s"] += total
            acc["forward_s"] += timers.forward_s
            acc["attention_s"] += timers.attention_s
            acc["attention_calls"] += timers.attention_calls
    return phases


def linear_curve(config, dtype: str, max_rows: int) -> list[float]:
    """Seconds of one decoder layer's linears at 0..``max_rows`` rows (vLLM's CPU dispatch)."""
    import torch

    from .vllm_internals.profile import linear_seconds, llama_linear_shapes

    return linear_seconds(llama_linear_shapes(config), config.num_hidden_layers, getattr(torch, dtype), max_rows)


def expected_share(lin: list[float], batch: int, r: float) -> float:
    """E[lin(n)] / lin(batch) for n ~ Binomial(batch, r): the share of a dense layer's linear time
    a routed layer still spends in a batch-``batch`` step."""
    expected = sum(math.comb(batch, k) * r ** k * (1 - r) ** (batch - k) * lin[k] for k in range(batch + 1))
    return expected / lin[batch]


def time_ideal(phase: dict, num_layers: int, routed: dict, share) -> float:
    """Dense step time / the ideal MoD step time. ``phase``: a ``dense_profile`` phase; ``routed``:
    {layer: routed fraction}; ``share(r)``: the linear-time share a layer routed at ``r`` keeps."""
    if not phase["steps"]:
        return float("nan")
    step, forward, attention = phase["step_s"], phase["forward_s"], phase["attention_s"]
    body, att = (forward - attention) / num_layers, attention / num_layers
    saved = sum(body * (1 - share(r)) + att * (1 - r * r) for r in routed.values())
    return step / (step - saved)
