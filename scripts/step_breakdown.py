"""Where a decode step's time goes: dense vs MoD on the same in-process vLLM engine.

    .venv/bin/python scripts/step_breakdown.py [MODEL_DIR ...]   (default: bench's dense, mod-all-in, mod)

Wraps vLLM and mod-serve functions with perf_counter timers (~1-2 us each) and prints, per model
and batch (1, 8; 512-token prompts, 1 OpenMP thread as served), the median per decode step of:

* step: the whole ``engine.step()``;
* scheduler + KV groups: ``Scheduler.schedule`` and ``update_from_output`` (routed settles included);
* inputs + metadata: the runner's ``_prepare_inputs`` (block tables, slot mappings of every KV cache
  group) and ``_build_attention_metadata`` (one build per group);
* routing bookkeeping: ``RoutingState.begin``/``end``/``trim_block_tables`` (MoD only);
* attention: the attention kernels and KV writes (``impl.forward`` + ``do_kv_cache_update``), all layers;
* router: the routers' float32 gates (MoD only; with the routed layer in the compiled graph, whose
  fused kernels time cannot be split off, the eager decision op that follows them);
* routed attention call: compact metadata + the routed layers' attention kernels (MoD only);
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
        wrap(attention.CpuAttentionKernels, "__call__", "attention")
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


def measure(model: str, batch: int, length: int = 512, steps: int = 24) -> dict[str, float]:
    from transformers import AutoTokenizer

    from mod_serve import bench

    tok = AutoTokenizer.from_pretrained(model)
    corpus = bench.corpus_token_ids(tok, length * batch + length)
    out: dict[str, list[float]] = collections.defaultdict(list)
    with bench.engine(model, 2 << 30, length + 64, DTYPE) as llm:
        eng = llm.llm_engine
        for rep in range(2):
            for i, p in enumerate(bench.prompts_of(corpus, length, batch)):
                eng.add_request(f"{rep}-{i}", {"prompt_token_ids": p}, bench._params(steps + 4))
            n = 0
            while eng.has_unfinished_requests():
                ACC.clear()
                t = time.perf_counter()
                eng.step()
                total = time.perf_counter() - t
                n += 1
                if n > 3:  # decode steps only
                    out["step"].append(total)
                    for k, v in ACC.items():
                        out[k].append(v)
    med = {k: 1e6 * statistics.median(v + [0.0] * (len(out["step"]) - len(v))) for k, v in out.items()}
    med["rest of step"] = med["step"] - sum(med.get(k, 0) for k in (
        "scheduler + KV groups", "inputs + metadata", "model forward", "LM head"))
    return med


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
    keys = ["step", "scheduler + KV groups", "inputs + metadata", "routing bookkeeping", "model forward",
            "attention", "router", "routed attention call", "LM head", "rest of step"]
    rows = []
    for model in models:
        for batch in BATCHES:
            med = measure(model, batch)
            rows.append((Path(model).name, batch, med))
            print(f"{Path(model).name} b{batch}: " + ", ".join(f"{k} {med.get(k, 0):.0f}" for k in keys), flush=True)
    print("\n| model | batch | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for name, batch, med in rows:
        print(f"| {name} | {batch} | " + " | ".join(f"{med.get(k, 0):.0f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
