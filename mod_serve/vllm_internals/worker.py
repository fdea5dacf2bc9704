"""Worker seam: bind the model runner to the model, trim block tables, report routed counts."""

from __future__ import annotations

import functools
import logging
import time

import torch

logger = logging.getLogger("vllm.mod_serve")  # under vLLM's logger, which has the handler


def _worker_base():
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def _lighten_block_tables(runner, routed_gids: set[int]) -> None:
    """Per-step block-table work a MoD model does not need.

    * A routed group's slot mapping: the routed layer computes its compact slots itself.
    * On the CPU, the copy of every table from its host buffer to its "device" buffer: vLLM's CPU
      runner makes the two one tensor (``CPUModelRunner._postprocess_tensors``), but the input
      batch it rebuilds for several KV cache groups gets separate ones again; they are made one
      tensor here again and the copy is skipped.
    * On the CPU, the other groups' slot mappings call vLLM's C++ kernel directly: its
      Triton-launcher emulation binds the call's signature every time (~25 us per group and step).
    """
    from vllm.triton_utils import HAS_TRITON
    from vllm.v1.utils import CpuGpuBuffer
    from vllm.v1.worker.block_table import SlotMappingMode

    on_cpu = runner.device.type == "cpu"
    for gid, table in enumerate(runner.input_batch.block_table.block_tables):
        if gid in routed_gids:
            table.slot_mapping_mode = SlotMappingMode.NONE
        if on_cpu:
            for buf in vars(table).values():
                if isinstance(buf, CpuGpuBuffer):
                    buf.gpu = buf.cpu
            table.commit_block_table = lambda num_reqs: None
            if not HAS_TRITON and table.dcp_world_size == 1 and table.slot_mapping_mode == SlotMappingMode.TOKEN_TO_KV_SLOT:
                table.compute_slot_mapping = functools.partial(_cpu_slot_mapping, table)


def _cpu_slot_mapping(table, num_reqs, query_start_loc, positions) -> None:
    """What vLLM's CPU replacement of its slot-mapping kernel runs (``cpu_triton_utils``)."""
    torch.ops._C.compute_slot_mapping_kernel_impl(query_start_loc, positions, table.block_table.gpu,
                                                  table.slot_mapping.gpu, table.block_size)


class MoDWorker(_worker_base()):
    def load_model(self, *args, **kwargs):
        out = super().load_model(*args, **kwargs)
        state = self._routing_state()
        if state is not None:
            state.bind_runner(self.model_runner)
        return out

    def compile_or_warm_up_model(self):
        out = super().compile_or_warm_up_model()
        from . import gemm

        start = time.perf_counter()
        ran = gemm.warm_up(self.model_runner.model, self.vllm_config.scheduler_config.max_num_batched_tokens)
        if ran:
            logger.info("mod-serve: built the routed linears' %d GEMM primitives in %.1f s", ran, time.perf_counter() - start)
        return out

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        state = self._routing_state()
        if state is not None:
            state.bind_groups(kv_cache_config)  # raises unless each routed layer has its own group
            _lighten_block_tables(self.model_runner, set(state.group_of_layer.values()))
            if self.vllm_config.cache_config.enable_prefix_caching and state.group_of_layer:
                # report r_i at every block boundary (prefix_cache registers the tail blocks)
                gid = next(iter(state.group_of_layer.values()))
                state.boundary_block_size = kv_cache_config.kv_cache_groups[gid].kv_cache_spec.block_size

    def execute_model(self, scheduler_output):
        state = self._routing_state()
        if state is not None:
            state.forget(scheduler_output.finished_req_ids)
            state.restore(getattr(scheduler_output, "mod_restored", None))  # prefix-cache hits
        output = super().execute_model(scheduler_output)
        if state is not None:
            state.trim_block_tables()
        return self._attach(output)

    def sample_tokens(self, grammar_output):
        return self._attach(super().sample_tokens(grammar_output))

    def _routing_state(self):
        return getattr(self.model_runner.model, "routing_state", None)

    def _attach(self, output):
        state = self._routing_state()
        if output is not None and state is not None and state.pending_report:
            output.mod_routed, state.pending_report = state.pending_report, {}
            output.mod_boundaries, state.pending_boundaries = state.pending_boundaries, {}
        return output

    def mod_kv_stats(self) -> dict:
        from vllm.distributed import get_pp_group, get_tp_group

        state = self._routing_state()
        if state is None:
            return {}
        return {**state.stats(), "tp_rank": get_tp_group().rank_in_group, "pp_rank": get_pp_group().rank_in_group}
