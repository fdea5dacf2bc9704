"""Scheduler seam: apply the worker's routed-token reports to the routed KV managers."""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from .kv import RoutedKVManager, routed_groups


class MoDScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        groups = routed_groups(self.kv_cache_config)  # raises if routed layers share a group
        managers = self.kv_cache_manager.coordinator.single_type_managers
        self.mod_managers: dict[int, RoutedKVManager] = {layer: managers[g] for layer, g in groups.items()}
        for layer, m in self.mod_managers.items():
            if not isinstance(m, RoutedKVManager) or m.kv_cache_spec.layer_index != layer:
                raise RuntimeError(f"mod-serve: KV cache group of routed layer {layer} has manager {type(m).__name__}")

    def routed_managers(self) -> dict[int, RoutedKVManager]:
        return self.mod_managers

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
        return super().update_from_output(scheduler_output, model_runner_output)
