"""Scheduler seam: apply the worker's routed-token reports to the routed KV managers, run
prefix caching for routed layers (``prefix_cache``), and report each request's routing."""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from . import prefix_cache
from .kv import RoutedKVManager, cdiv, routed_groups


def _routing_config(vllm_config):
    from mod_serve.config import RoutingConfig

    hf = vllm_config.model_config.hf_config
    mod = getattr(hf, "mod", None)
    if mod is None:
        return None
    return RoutingConfig.from_dict(dict(mod), hf.num_hidden_layers)


class MoDScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        groups = routed_groups(self.kv_cache_config)  # raises if routed layers share a group
        managers = self.kv_cache_manager.coordinator.single_type_managers
        self.mod_managers: dict[int, RoutedKVManager] = {layer: managers[g] for layer, g in groups.items()}
        for layer, m in self.mod_managers.items():
            if not isinstance(m, RoutedKVManager) or m.kv_cache_spec.layer_index != layer:
                raise RuntimeError(f"mod-serve: KV cache group of routed layer {layer} has manager {type(m).__name__}")
        routing = _routing_config(self.vllm_config)
        self.mod_threshold = routing.threshold if routing is not None else None
        prefix_cache.DEFAULT_THRESHOLD = self.mod_threshold  # this engine's p, for the block hashes
        self.mod_index = None
        if self.mod_managers and self.cache_config.enable_prefix_caching:
            self.mod_index = prefix_cache.RoutedPrefixIndex(self.kv_cache_manager.block_pool)
        self._mod_hits: dict[str, int] = {}  # requests admitted with a hit in this schedule()

    def routed_managers(self) -> dict[int, RoutedKVManager]:
        return self.mod_managers

    # ---- prefix caching ----------------------------------------------------------------------
    def _get_local_prefix_cache_hit(self, request):
        blocks, num_hit, *rest = super()._get_local_prefix_cache_hit(request)
        index = self.mod_index
        if index is not None:
            request_id = request.request_id
            for m in self.mod_managers.values():
                gid = m.kv_cache_group_id
                hit = index.last_hit.pop(gid, None)
                if num_hit and (hit is None or hit.num_tokens != num_hit):
                    # not the coordinator's final answer for this group: look it up at the hit
                    hit = index.lookup(request.block_hashes, num_hit, gid, m.block_size)
                    assert hit.num_tokens == num_hit
                if num_hit:
                    m.pending_hit[request_id] = hit
                    blocks.blocks[gid][:] = hit.blocks
                else:
                    m.pending_hit.pop(request_id, None)
            if num_hit:
                self._mod_hits[request_id] = num_hit
        return (blocks, num_hit, *rest)

    def schedule(self, *args, **kwargs):
        self._mod_hits.clear()
        out = super().schedule(*args, **kwargs)
        restored = {}
        for request_id, num_hit in self._mod_hits.items():
            if request_id not in out.num_scheduled_tokens:
                continue  # not admitted (no room): looked up again next time
            restored[request_id] = (num_hit, {layer: m.routed.get(request_id, 0) for layer, m in self.mod_managers.items()})
        self._mod_hits.clear()
        # The worker resumes these requests at N with each layer's routed count r_i(N).
        out.mod_restored = restored
        return out

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        ok = super().reset_prefix_cache(*args, **kwargs)
        if ok and self.mod_index is not None:
            self.mod_index.clear()
        return ok

    # ---- after a step ------------------------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        report = getattr(model_runner_output, "mod_routed", None) or {}
        managers = self.mod_managers
        if managers and scheduler_output.total_num_scheduled_tokens and not report:
            # Without the report the scheduler's block lists and the worker's trimmed block
            # tables would disagree, and later writes would land in the wrong blocks.
            raise RuntimeError("mod-serve: the worker's routed-token report is missing from the step output")
        for req_id, (settled, routed) in report.items():
            for layer, count in routed.items():
                managers[layer].settle(req_id, settled, count)
        if self.mod_index is not None:
            self._register(report, getattr(model_runner_output, "mod_boundaries", None) or {})
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.mod_managers:
            self._figures_for_stop_strings(outputs)
        return outputs

    def _figures_for_stop_strings(self, outputs) -> None:
        """Stop strings end a request in the front end (detokenizer), after an engine output
        that is not final: requests with stop strings carry their figures on every output."""
        for eco in outputs.values():
            for out in eco.outputs:
                if out.finish_reason is not None or out.kv_transfer_params is not None:
                    continue
                request = self.requests.get(out.request_id)
                params = request.sampling_params if request is not None else None
                if params is not None and params.stop:
                    out.kv_transfer_params = {"mod": self.mod_request_figures(request)}

    def _register(self, report, boundaries) -> None:
        """Prefix-cache entries for what this step computed: slots are written by now."""
        managers = self.mod_managers
        for req_id in report:
            request = self.requests.get(req_id)
            if request is None:
                continue
            for m in managers.values():
                m.register_copy(request)
            for num_tokens, counts in boundaries.get(req_id, ()):
                for layer, r in counts.items():
                    managers[layer].register_boundary(request, num_tokens, r)

    # ---- per-request routing report ------------------------------------------------------------
    def mod_request_figures(self, request) -> dict | None:
        """``{"threshold", "routed_fraction", "kv_bytes", "dense_kv_bytes"}`` of a request: its
        p, the fraction of its computed tokens routed into each routed layer, and the KV bytes its
        routed layers hold (whole blocks, all tensor-parallel ranks) against the same layers dense."""
        if not self.mod_managers or self.mod_threshold is None:
            return None
        from .routing import request_threshold

        params = request.sampling_params
        try:
            p = request_threshold(params.extra_args if params is not None else None, self.mod_threshold)
        except ValueError:
            p = self.mod_threshold
        tp = self.vllm_config.parallel_config.tensor_parallel_size
        fraction, kv, dense = {}, 0, 0
        for layer, m in sorted(self.mod_managers.items()):
            n = m.settled.get(request.request_id, 0)
            r = m.routed.get(request.request_id, 0)
            fraction[str(layer)] = r / n if n else 0.0
            page = m.kv_cache_spec.page_size_bytes * tp
            kv += cdiv(r, m.block_size) * page
            dense += cdiv(n, m.block_size) * page
        return {"threshold": p, "routed_fraction": fraction, "kv_bytes": kv, "dense_kv_bytes": dense}

    def _free_request(self, request, *args, **kwargs):
        figures = self.mod_request_figures(request)  # before the managers forget the request
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        if figures is not None:
            kv_params = {**(kv_params or {}), "mod": figures}
        return kv_params, ec_params
