"""Prefix-cache seam: automatic prefix caching for routed (MoD) layers.

A routed layer's cache holds only the tokens routed into it, at compact positions, so vLLM's
position-indexed block hashes do not name its blocks. Design ("tail entry at every boundary +
copy-on-write of the partial tail", design (d) of ``shared/notes/mod-prefix-cache.md``):

* **Entries.** When a request's step crosses a hash boundary ``N = jB`` (B = block size), the
  worker reports ``r_i(N)``, the tokens routed into each routed layer i among the first N. After
  the step (synchronous scheduling: the slots are written), the scheduler registers, for each
  routed layer, an :class:`Entry` under vLLM's own key ``(request.block_hashes[j-1], group)``:
  the request's *tail* block ``k = ceil(r/B) - 1`` (slots ``[0, r - kB)`` valid), ``r``, and a
  link to the entry of its block ``k - 1``. The block also gets the key in vLLM's block pool, so
  it is retained LRU like any cached block and the key is dropped when the block is reused.
  ``r_i(N) = 0`` (nothing routed into the layer yet) is a block-less *zero entry*.
* **Validity.** A block's contents are those of its current allocation: slots once written are
  never rewritten (a compact sequence only grows), so an entry is valid while none of the
  blocks on its chain has been handed out again. The index counts allocations per block
  (``generation``, bumped in ``BlockPool.get_new_blocks``); an entry records the generation of
  its block, so validation is exact and stale entries are never used.
* **Lookup** (``RoutedKVManager.find_longest_cache_hit``, inside vLLM's hybrid coordinator): the
  longest boundary ``N <= max_length`` with a valid entry; the hit is the chain's blocks
  ``0..k`` and ``r_i(N)``. Hits are exactly the full-attention hits: no token of a hit is lost.
* **Copy-on-write.** If ``r mod B != 0`` the tail is still the producer's writable block: the
  consumer gets a private copy (vLLM's partial-hit CoW: ``kv_cache_block_copies``, run by the
  worker before the forward), so no block is ever shared while it may be written.
* **Worker.** New and resumed requests with a hit get ``(N, {layer: r_i(N)})`` through
  ``SchedulerOutput.mod_restored``; ``RoutingState`` resumes there.

Per-request threshold p: p changes every routed layer's KV, so it goes into the block hashes
(``("mod_p", p)`` on the first block, only when p is not the checkpoint's default, so default
traffic keeps sharing), by wrapping ``kv_cache_utils.generate_block_hash_extra_keys``.
"""

from __future__ import annotations

import collections
import dataclasses

from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

from .routing import request_threshold


@dataclasses.dataclass(eq=False, slots=True)
class Entry:
    """Routed layer's tail block at a boundary: block ``k`` of the compact sequence holds the
    routed tokens ``[kB, r)``; ``prev`` is the entry of block ``k - 1`` (None for k = 0)."""

    block_id: int
    generation: int
    k: int
    r: int
    prev: Entry | None


ZERO = Entry(block_id=-1, generation=-1, k=-1, r=0, prev=None)
"""Zero entry: no token of the prefix routed into the layer (no block)."""


@dataclasses.dataclass
class Hit:
    num_tokens: int  # N
    routed: int  # r_i(N)
    entry: Entry | None  # the tail entry (None when r == 0)
    blocks: list  # KVCacheBlocks 0..k


class RoutedPrefixIndex:
    """Entries of every routed KV cache group, kept beside vLLM's block pool."""

    MAX_ZERO_ENTRIES = 1 << 16

    def __init__(self, block_pool) -> None:
        self.pool = block_pool
        self.generation = [0] * len(block_pool.blocks)
        self.entries: dict[bytes, list[Entry]] = {}
        self.num_entries = 0
        self._prune_at = 4096
        self.zeros: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.last_hit: dict[int, Hit] = {}  # group id -> result of its latest lookup
        self.stats = {"lookups": 0, "registered": 0, "zero_registered": 0}
        generation = self.generation
        get_new_blocks = block_pool.get_new_blocks

        def get_new_blocks_counted(num_blocks):
            blocks = get_new_blocks(num_blocks)
            for b in blocks:
                generation[b.block_id] += 1
            return blocks

        block_pool.get_new_blocks = get_new_blocks_counted  # every allocation of a block, any group
        block_pool.mod_index = self

    # ---- registration -----------------------------------------------------------------------
    def entry_for(self, block, k: int, r: int, prev: Entry | None) -> Entry:
        return Entry(block.block_id, self.generation[block.block_id], k, r, prev)

    def register(self, key: bytes, entry: Entry, block, num_tokens: int) -> None:
        """Make ``entry`` findable under ``key`` and give its block the key in vLLM's pool (LRU
        retention once free; the key goes when the block is handed out again)."""
        cands = self.entries.get(key)
        if cands is None:
            self.entries[key] = [entry]
            self.num_entries += 1
        else:
            before = len(cands)
            cands[:] = [e for e in cands if self.valid_head(e) and e.block_id != entry.block_id]
            cands.append(entry)
            self.num_entries += len(cands) - before
        self.pool._insert_block_hash(key, block, num_tokens=num_tokens)
        self.stats["registered"] += 1
        if self.num_entries > self._prune_at:
            self.prune()

    def register_zero(self, key: bytes) -> None:
        self.zeros[key] = None
        self.zeros.move_to_end(key)
        self.stats["zero_registered"] += 1
        while len(self.zeros) > self.MAX_ZERO_ENTRIES:
            self.zeros.popitem(last=False)

    def prune(self) -> None:
        live = {}
        n = 0
        for key, cands in self.entries.items():
            keep = [e for e in cands if self.valid_head(e)]
            if keep:
                live[key] = keep
                n += len(keep)
        self.entries, self.num_entries = live, n
        self._prune_at = max(4096, 2 * n)

    def clear(self) -> None:
        self.entries.clear()
        self.zeros.clear()
        self.last_hit.clear()
        self.num_entries = 0

    # ---- lookup -------------------------------------------------------------------------------
    def valid_head(self, e: Entry) -> bool:
        return self.generation[e.block_id] == e.generation

    def chain(self, e: Entry) -> list | None:
        """Blocks ``0..e.k`` if every block on the chain still holds what it held when its entry
        was made, else None."""
        blocks = self.pool.blocks
        gen = self.generation
        out = []
        k = e.k
        while e is not None:
            if e.k != k or gen[e.block_id] != e.generation:
                return None
            out.append(blocks[e.block_id])
            e, k = e.prev, k - 1
        if k != -1:
            return None
        out.reverse()
        return out

    def lookup(self, block_hashes, max_length: int, group_id: int, block_size: int) -> Hit:
        """Longest boundary ``N <= max_length`` at which this routed group has a valid entry."""
        self.stats["lookups"] += 1
        for j in range(min(max_length // block_size, len(block_hashes)), 0, -1):
            key = make_block_hash_with_group_id(block_hashes[j - 1], group_id)
            for e in reversed(self.entries.get(key, ())):
                blocks = self.chain(e)
                if blocks is not None:
                    hit = Hit(j * block_size, e.r, e, blocks)
                    break
            else:
                if key not in self.zeros:
                    continue
                hit = Hit(j * block_size, 0, None, [])
            break
        else:
            hit = Hit(0, 0, None, [])
        self.last_hit[group_id] = hit
        return hit


# ---- the threshold in the block hashes ----------------------------------------------------------
DEFAULT_THRESHOLD: float | None = None
"""The engine's default p (checkpoint or --mod-threshold), set by ``MoDScheduler`` in the
engine-core process; None (a dense model, or the front end) adds no key."""


def threshold_key(request) -> tuple | None:
    default = DEFAULT_THRESHOLD
    params = request.sampling_params
    if default is None or params is None or not params.extra_args:
        return None
    p = request_threshold(params.extra_args, default)
    return None if p == default else ("mod_p", p)


def install_block_hash_key() -> None:
    """Wrap ``kv_cache_utils.generate_block_hash_extra_keys`` (looked up by vLLM's block hasher
    at every call) so that a request's first block hash carries its own threshold p."""
    from vllm.v1.core import kv_cache_utils

    orig = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(orig, "mod_serve", False):
        return

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, mm_idx = orig(request, start_token_idx, end_token_idx, start_mm_idx)
        if start_token_idx == 0:
            extra = threshold_key(request)
            if extra is not None:
                keys = (*(keys or ()), extra)
        return keys, mm_idx

    generate_block_hash_extra_keys.mod_serve = True
    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys


# ---- front-end validation of the per-request threshold --------------------------------------------
def _threshold_error_base():
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError


class ThresholdError(_threshold_error_base(), ValueError):
    """An invalid ``mod_threshold``: a ``ValueError`` for offline callers, and vLLM's
    ``VLLMValidationError`` (a client error: HTTP 400 naming the parameter) for its server."""


def check_request_threshold(params) -> None:
    extra = getattr(params, "extra_args", None)
    if not extra or "mod_threshold" not in extra:
        return
    try:
        request_threshold(extra, 0.0)
    except ValueError as e:
        raise ThresholdError(str(e), parameter="mod_threshold", value=extra["mod_threshold"]) from None


def install_request_check() -> None:
    """Check ``SamplingParams.extra_args["mod_threshold"]`` in the front-end process, before the
    request reaches the engine core (where a bad value would fail the whole step): vLLM's input
    processor calls ``current_platform.validate_request(inputs, params)`` for every request;
    this wraps it (once per process, from the MoD config hook). An invalid value raises
    ``ThresholdError`` for that request only. (vLLM's other per-request hook, a custom logits
    processor's ``validate_params``, turns every ``ValueError`` into a plain
    ``VLLMValidationError``, which offline callers catching ``ValueError`` would miss.)"""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    orig = cls.validate_request
    if getattr(getattr(orig, "__func__", None), "mod_serve", False):
        return

    def validate_request(klass, processed_inputs, params) -> None:
        orig(processed_inputs, params)
        check_request_threshold(params)

    validate_request.mod_serve = True
    cls.validate_request = classmethod(validate_request)
