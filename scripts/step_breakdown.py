"""Where a decode step's time goes: dense vs MoD on the same in-process vLLM engine.

    .venv/bin/python scripts/step_breakdown.py [MODEL_DIR ...]   (default: bench's dense, mod-all-in, mod)

Environment: ``BATCHES`` (default 1,8), ``LENGTH`` (prompt tokens, default 512), ``TOGETHER=1``:
every model's engine up at once, each round of a batch running every model once in alternating
order, as ``mod-serve bench`` runs them (default: one engine at a time).

Wraps vLLM and mod-serve functions with perf_counter timers (~1-2 us each) and prints, per model
and batch (1 OpenMP thread as served), the median per decode step of:

* step: the whole ``engine.step()``;
* scheduler + KV groups: ``Scheduler.schedule`` and ``update_from_output`` (routed settles included);
* inputs + metadata: the runner's ``_prepare_inputs`` (block tables, slot mappings of every KV cache
  group) and ``_build_attention_metadata`` (one build per group);
* routing bookkeeping: ``RoutingState.begin``/``end``/``trim_block_tables`` (MoD only);
* attention: the attention kernels and KV writes (``impl.forward`` + ``do_kv_cache_update``), all layers;
  routed kernels: the routed layers' part of it (their direct kernel calls, ``CpuAttentionKernels``);
* router: the routers' float32 gates (MoD only; with the routed layer in the compiled graph, whose
  fused kernels time cannot be split off, the eager decision op that follows them);
* routed attention call: compact metadata + the routed layers' attention kernels (MoD only);
  on the CPU with the C++ routed ops (``cpu_decode``) decode steps call neither Python function,
  so "router" and "routed attention call" read 0 and their work is inside "model forward";
* model forward (includes attention, router and routed attention call; routing bookkeeping is
  inside it after the change, outside before); LM head: ``compute_logits``; rest of step: sampling,
  output processing and the engine loop.

Only functions present in both the eager (before) and compiled (after) plugin are wrapped, so the
same script measures both (run it from a checkout of each).
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time
from pathlib import Path

DTYPE = os.environ.get("DTYPE", "float32")  # bf16 GEMMs fall back from oneDNN without AVX-512 BF16
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1,8").split(",")]
ACC: dict[str, float] = collections.defaultdict(float)


def wrap(owner, attr: str, key: str) -> None:
    fn = getattr(owner, attr)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            ACC[key] += time.perf_counter() - t

    setattr(owner, attr, timed)


def instrument() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import mod_serve.vllm_model as vm
    from mod_serve.vllm_internals import RoutingState

    wrap(Scheduler, "schedule", "scheduler + KV groups")
    wrap(Scheduler, "update_from_output", "scheduler + KV groups")
    wrap(GPUModelRunner, "_prepare_inputs", "inputs + metadata")
    wrap(GPUModelRunner, "_build_attention_metadata", "inputs + metadata")
    for name in ("begin", "end", "trim_block_tables"):
        wrap(RoutingState, name, "routing bookkeeping")
    wrap(CPUAttentionBackendImpl, "forward", "attention")
    wrap(CPUAttentionBackendImpl, "do_kv_cache_update", "attention")
    from mod_serve.vllm_internals import attention

    if hasattr(attention, "CpuAttentionKernels"):  # routed layers call the same two C++ kernels directly
        wrap(attention.CpuAttentionKernels, "__call__", "routed kernels")
        wrap(attention.CpuAttentionKernels, "__call__", "attention")  # (both keys count the call)
    wrap(vm, "routed_attention", "routed attention call")
    if hasattr(vm.MoDLlamaDecoderLayer, "run_routed_graph"):
        # compiled plugin: the router's GEMM and sigmoid are graph ops; its eager part is the
        # decision op (g >= p, indices, bookkeeping)
        wrap(vm.MoDLlamaDecoderLayer, "route", "router")
    else:
        wrap(vm, "router_probs", "router")
    wrap(vm.LlamaForCausalLM, "compute_logits", "LM head")
    wrap(vm.MoDLlamaForCausalLM, "forward", "model forward")
    from vllm.model_executor.models.llama import LlamaForCausalLM

    wrap(LlamaForCausalLM, "forward", "model forward")


KEYS = ["step", "scheduler + KV groups", "inputs + metadata", "routing bookkeeping", "model forward",
        "attention", "routed kernels", "router", "routed attention call", "LM head", "rest of step"]


def _run(llm, prompts: list[list[int]], steps: int, tag: str, out: dict[str, list[float]]) -> None:
    """One batch to its end; each decode step's timers appended to ``out`` (0 where not called)."""
    from mod_serve import bench

    eng = llm.llm_engine
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, bench._params(steps + 4))
    n = 0
    while eng.has_unfinished_requests():
        ACC.clear()
        t = time.perf_counter()
        eng.step()
        total = time.perf_counter() - t
        n += 1
        if n > 3:  # decode steps only
            out["step"].append(total)
            for k in KEYS[1:-1]:
                out[k].append(ACC.get(k, 0.0))


def _medians(out: dict[str, list[float]]) -> dict[str, float]:
    med = {k: 1e6 * statistics.median(v) for k, v in out.items()}
    med["rest of step"] = med["step"] - sum(med.get(k, 0) for k in (
        "scheduler + KV groups", "inputs + metadata", "model forward", "LM head"))
    return med


def measure(models: list[str], batch: int, length: int, together: bool, steps: int = 24, rounds: int = 2):
    """Per model, the median timers of ``rounds`` batches of ``steps`` decode steps."""
    import contextlib

    from transformers import AutoTokenizer

    from mod_serve import bench

    tok = AutoTokenizer.from_pretrained(models[0])
    prompts = bench.prompts_of(bench.corpus_token_ids(tok, length * batch + length), length, batch)
    outs = [collections.defaultdict(list) for _ in models]
    if not together:
        for j, model in enumerate(models):
            with bench.engine(model, 2 << 30, length + 64, DTYPE) as llm:
                for r in range(rounds):
                    _run(llm, prompts, steps, f"{r}", outs[j])
        return [_medians(o) for o in outs]
    with contextlib.ExitStack() as stack:
        llms = [stack.enter_context(bench.engine(m, 2 << 30, length + 64, DTYPE)) for m in models]
        for r in range(rounds):
            for j in (range(len(models)) if r % 2 == 0 else reversed(range(len(models)))):
                _run(llms[j], prompts, steps, f"{r}-{j}", outs[j])
    return [_medians(o) for o in outs]


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    instrument()
    models = sys.argv[1:]
    if not models:
        work = Path.home() / ".cache" / "mod-serve" / "bench"
        from mod_serve.default_model import prepare_base

        models = [str(prepare_base()), str(work / "mod-all-in"), str(work / "mod-calibrated-0.5")]
    keys = KEYS
    length = int(os.environ.get("LENGTH", "512"))
    together = os.environ.get("TOGETHER") == "1"
    rows = []
    for batch in BATCHES:
        for model, med in zip(models, measure(models, batch, length, together)):
            rows.append((Path(model).name, batch, med))
            print(f"{Path(model).name} b{batch}: " + ", ".join(f"{k} {med.get(k, 0):.0f}" for k in keys), flush=True)
    print("\n| model | batch | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for name, batch, med in rows:
        print(f"| {name} | {batch} | " + " | ".join(f"{med.get(k, 0):.0f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
