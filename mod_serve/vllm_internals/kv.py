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

    Prefix caching (see ``prefix_cache``): a hit of N tokens gives the request this layer's
    blocks ``0..k`` and ``routed = r(N)``; a partial tail block (``r mod B != 0``) is replaced by
    a private copy (vLLM's copy-on-write). After each step the scheduler registers the tail block
    at every boundary the request crossed (``register_boundary``).
    """

    supports_fine_grained_hash_lookup = False

    def __init__(self, kv_cache_spec: RoutedAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.settled: dict[str, int] = {}
        self.routed: dict[str, int] = {}
        self.pending_hit: dict[str, object] = {}  # req -> prefix_cache.Hit, until its blocks are added
        self.tail_entry: dict[str, object] = {}  # req -> prefix_cache.Entry of its current tail block
        self.unregistered_copy: dict[str, tuple[int, object]] = {}  # req -> (N, Entry of its CoW copy)

    def _worst_case_tokens(self, request_id: str, num_tokens: int) -> int:
        settled = self.settled.get(request_id, 0)
        return self.routed.get(request_id, 0) + max(num_tokens - settled, 0)

    def _hit(self, request_id: str, num_local_computed_tokens: int, new_computed_blocks):
        if num_local_computed_tokens == 0:
            return None
        hit = self.pending_hit.get(request_id)
        if hit is None or hit.num_tokens != num_local_computed_tokens or len(hit.blocks) != len(new_computed_blocks):
            raise RuntimeError(
                f"mod-serve: prefix-cache hit of request {request_id} for routed layer "
                f"{self.kv_cache_spec.layer_index} does not match the scheduler's ({num_local_computed_tokens} tokens)"
            )
        return hit

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens=0,
                                   num_local_computed_tokens=0, *args, **kwargs):
        held = len(self.req_to_blocks.get(request_id, ()))
        if request_id in self.settled or held:  # running: no new hit
            assert len(new_computed_blocks) == 0
            needed = cdiv(self._worst_case_tokens(request_id, num_tokens), self.block_size)
            return max(needed - held, 0)
        hit = self._hit(request_id, num_local_computed_tokens, new_computed_blocks)
        settled, routed = (hit.num_tokens, hit.routed) if hit else (0, 0)
        needed = cdiv(routed + max(num_tokens - settled, 0), self.block_size)
        num = max(needed - len(new_computed_blocks), 0) + self._get_num_evictable_blocks(new_computed_blocks)
        if routed % self.block_size:
            num += 1  # the private copy of the partial tail block
        return num

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens) -> None:
        assert num_external_computed_tokens == 0, "mod-serve: KV connectors are not supported for MoD models"
        hit = self._hit(request_id, num_local_computed_tokens, new_computed_blocks)
        self.pending_hit.pop(request_id, None)
        if hit is None:
            return
        req_blocks = self.req_to_blocks[request_id]
        assert not req_blocks
        self.block_pool.touch(new_computed_blocks)
        req_blocks.extend(new_computed_blocks)
        self.num_cached_block[request_id] = len(req_blocks)
        self.settled[request_id], self.routed[request_id] = hit.num_tokens, hit.routed
        if hit.entry is not None:
            self.tail_entry[request_id] = hit.entry
        if hit.routed % self.block_size:
            # The tail block may still be written by its producer: vLLM's allocate_new_blocks
            # swaps in a private copy (the source keeps a reference until the copy is queued).
            self._partial_hit_reqs[request_id] = (len(req_blocks) - 1, req_blocks[-1])

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        hit = self.pending_hit.pop(request_id, None)
        if hit is not None and request_id not in self.settled:
            # A hit where no group had a block (vLLM then skips add_local_computed_blocks):
            # every routed layer of the prefix is empty.
            assert not hit.blocks
            self.settled[request_id], self.routed[request_id] = hit.num_tokens, 0
        cow = self._partial_hit_reqs.get(request_id)
        out = super().allocate_new_blocks(
            request_id, self._worst_case_tokens(request_id, num_tokens), num_tokens_main_model
        )
        if cow is not None:
            index = self.block_pool.mod_index
            k, source = cow
            copy = self.req_to_blocks[request_id][k]
            assert copy is not source
            hit_entry = self.tail_entry[request_id]
            entry = index.entry_for(copy, hit_entry.k, hit_entry.r, hit_entry.prev)
            self.tail_entry[request_id] = entry
            # registered after the step that runs the copy (register_step)
            self.unregistered_copy[request_id] = (self.settled[request_id], entry)
        return out

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

    def register_copy(self, request) -> None:
        """After the step that ran a hit's copy-on-write: the private copy holds the hit's tail,
        so it is an entry at the hit boundary too (keeps chains through it findable and LRU)."""
        pending = self.unregistered_copy.pop(request.request_id, None)
        if pending is None:
            return
        num_tokens, entry = pending
        index = self.block_pool.mod_index
        block = self.block_pool.blocks[entry.block_id]
        if index.generation[entry.block_id] != entry.generation:
            return
        key = self._key(request, num_tokens)
        index.register(key, entry, block, num_tokens)

    def _key(self, request, num_tokens: int) -> bytes:
        from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

        return make_block_hash_with_group_id(request.block_hashes[num_tokens // self.block_size - 1],
                                             self.kv_cache_group_id)

    def register_boundary(self, request, num_tokens: int, routed: int) -> None:
        """Register this layer's tail block at boundary ``num_tokens`` (its slots ``[0, routed)``
        are written: called after the step's report)."""
        request_id = request.request_id
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None or num_tokens > self.settled.get(request_id, -1) or num_tokens % self.block_size:
            return
        if len(request.block_hashes) < num_tokens // self.block_size:
            return
        index = self.block_pool.mod_index
        key = self._key(request, num_tokens)
        if routed == 0:
            index.register_zero(key)
            return
        k = cdiv(routed, self.block_size) - 1
        if k >= len(blocks):
            return
        last = self.tail_entry.get(request_id)
        if k == 0:
            prev = None
        elif last is not None and last.k == k and last.block_id == blocks[k].block_id:
            prev = last.prev
        elif last is not None and last.k == k - 1 and last.block_id == blocks[k - 1].block_id:
            prev = last
        else:  # the chain is broken (should not happen): stop registering this request
            self.tail_entry.pop(request_id, None)
            return
        entry = index.entry_for(blocks[k], k, routed, prev)
        index.register(key, entry, blocks[k], num_tokens)
        self.tail_entry[request_id] = entry

    def pop_blocks_for_free(self, request_id: str):
        self.settled.pop(request_id, None)
        self.routed.pop(request_id, None)
        self.pending_hit.pop(request_id, None)
        self.tail_entry.pop(request_id, None)
        self.unregistered_copy.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block=False, alignment_tokens=None, dcp_world_size=1, pcp_world_size=1):
        """The longest boundary ``N <= max_length`` where this routed layer has a valid tail
        entry: its blocks ``0..k`` (``prefix_cache.RoutedPrefixIndex.lookup``)."""
        assert len(kv_cache_group_ids) == 1, "every routed layer is its own KV cache group"
        assert not drop_eagle_block and dcp_world_size == 1 and pcp_world_size == 1
        block_size = kv_cache_spec.block_size
        assert block_pool.hash_block_size == block_size, "routed layers hash at their own block size"
        hit = block_pool.mod_index.lookup(block_hashes, max_length, kv_cache_group_ids[0], block_size)
        return (list(hit.blocks),), hit.num_tokens

    def cache_blocks(self, *args, **kwargs) -> None:
        # Routing is known only after the forward: registered by the scheduler after the step.
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
