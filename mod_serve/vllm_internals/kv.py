"""KV cache seam: the routed layer's spec, its scheduler-side manager, and the grouping check.

Each routed layer is its own KV cache group with a ``RoutedAttentionSpec``; its
``RoutedKVManager`` keeps, per request, blocks for the tokens routed into that layer only (a
compact per-layer sequence). Before a step it reserves the worst case (every scheduled token
routed in); after the step the worker reports how many tokens each request really routed into
each layer, and ``settle`` returns the surplus blocks to vLLM's block pool.
"""

from __future__ import annotations

import dataclasses

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec, UniformTypeKVCacheSpecs


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutedAttentionSpec(AttentionSpec):
    """Causal attention over the tokens routed into one layer.

    Not a FullAttentionSpec, so vLLM never merges it with full-attention layers, and uniform only
    with itself (``is_uniform_with_collection``), so every routed layer becomes its own KV cache
    group even when every layer of the model is routed. Memory planning keeps the full-attention
    worst case: every token may be routed in."""

    layer_index: int = -1

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    def is_uniform_with_collection(self, specs: dict[str, KVCacheSpec]) -> bool:
        # The default only checks the class: with every layer routed, vLLM would then put all
        # routed layers into one UniformTypeKVCacheSpecs group sharing one block list.
        return all(s == self for s in specs.values())


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


def routed_groups(kv_cache_config) -> dict[int, int]:
    """{routed layer index: KV cache group id}, checking that vLLM gave every routed layer a
    group of its own (a shared group would hold one block list for several compact lengths)."""
    out: dict[int, int] = {}
    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        inner = spec.kv_cache_specs.values() if isinstance(spec, UniformTypeKVCacheSpecs) else [spec]
        routed = [s for s in inner if isinstance(s, RoutedAttentionSpec)]
        if not routed:
            continue
        if not isinstance(spec, RoutedAttentionSpec) or len(group.layer_names) != 1:
            raise RuntimeError(
                "mod-serve: vLLM put routed layers "
                f"{sorted(s.layer_index for s in routed)} into one KV cache group "
                f"({type(spec).__name__}, layers {group.layer_names}); every routed layer needs a group "
                "of its own. This vLLM version groups KV cache specs differently from 0.32.0."
            )
        out[spec.layer_index] = gid
    return out
