"""The compact per-layer KV cache of the reference model, as a transformers ``Cache``.

Layer i's cache holds K/V of the tokens routed into layer i and nothing else (for an unrouted
layer: every token that is not padding). Each sequence of the batch fills its own slots
``0, 1, 2, ...`` in order, so the compact order is the causal order; sequences with fewer routed-in
tokens are padded at the end with zero slots that no real query attends to. Padding tokens of the
input are never cached. RoPE is applied before caching, so a slot needs no position bookkeeping.

Because it is a ``Cache``, ``GenerationMixin.generate`` (greedy, sampling, beam search) and
``pipeline("text-generation")`` drive it; ``get_seq_length()`` is the number of input columns fed
so far (padding included), which is what generate's input slicing expects, while ``seen`` counts
each sequence's real tokens: the next token's true position.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class RoutedLayer(DynamicLayer):
    """One layer's compact cache: ``keys``/``values`` ``[B, kv_heads, L, head_dim]`` with sequence b
    in slots ``0 .. lengths[b] - 1`` (L = the longest); the layer's queries at one step are each
    sequence's routed-in tokens in order, padded to the same count (``rows`` marks the real ones)."""

    is_croppable = False  # which of the last n tokens went in is not recorded

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lengths: torch.Tensor | None = None  # [B] slots in use per sequence

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, heads, _, dim = key_states.shape
        self.keys = key_states.new_zeros(B, heads, 0, dim)
        self.values = value_states.new_zeros(B, heads, 0, value_states.shape[-1])
        self.lengths = torch.zeros(B, dtype=torch.long, device=key_states.device)

    def reset(self) -> None:
        super().reset()
        self.lengths = None

    def update(self, key_states, value_states, rows=None, *args, **kwargs):
        """Write the real rows of ``key_states`` ``[B, kv_heads, R, head_dim]`` to each sequence's
        next free slots; returns all cached keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if rows is None:
            rows = torch.ones(key_states.shape[0], key_states.shape[2], dtype=torch.bool, device=key_states.device)
        if rows.all() and (self.lengths == self.keys.shape[-2]).all():  # no gaps (e.g. batch 1): append
            self.lengths = self.lengths + rows.shape[1]
            return super().update(key_states, value_states)
        slots = self.lengths[:, None] + rows.cumsum(1) - 1
        self.lengths = self.lengths + rows.sum(1)
        grow = int(self.lengths.max()) - self.keys.shape[-2]
        if grow > 0:
            self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], grow, self.keys.shape[-1])], -2)
            self.values = torch.cat(
                [self.values, self.values.new_zeros(*self.values.shape[:2], grow, self.values.shape[-1])], -2
            )
        b, j = rows.nonzero(as_tuple=True)
        self.keys[b, :, slots[b, j]] = key_states[b, :, j]
        self.values[b, :, slots[b, j]] = value_states[b, :, j]
        return self.keys, self.values

    def causal_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """After ``update``: [B, 1, R, L] bool, query row j of sequence b sees slots up to its own.

        A padding row (j >= its sequence's count) sees slot 0 at least, so its (discarded) output
        stays finite."""
        first = self.lengths - rows.sum(1)  # slot of each sequence's first row this step
        own = first[:, None] + torch.arange(rows.shape[1], device=rows.device)
        return (torch.arange(self.keys.shape[-2], device=rows.device) <= own[..., None])[:, None]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("the compact MoD cache cannot be cropped (assisted decoding is not supported)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values, self.lengths = self.keys[indices], self.values[indices], self.lengths[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.keys.device) if self.is_initialized else beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys, self.values, self.lengths = (
                t.repeat_interleave(repeats, dim=0) for t in (self.keys, self.values, self.lengths)
            )


class RoutedKVCache(Cache):
    """The model's KV cache: one ``RoutedLayer`` per decoder layer.

    ``num_tokens``: input columns fed so far (padding included); ``seen``: ``[B]`` real tokens fed
    per sequence (None before the first forward); ``layer_len(i)``: K/V entries layer i holds.
    """

    def __init__(self, num_layers: int):
        super().__init__(layers=[RoutedLayer() for _ in range(num_layers)])
        self.num_tokens = 0
        self.seen: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_tokens

    def layer_len(self, layer: int) -> int:
        """K/V entries held by ``layer``, summed over the batch (padding slots not counted)."""
        lengths = self.layers[layer].lengths
        return 0 if lengths is None else int(lengths.sum())

    def start_positions(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """[B] true position of each sequence's next real token."""
        if self.seen is None:
            self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        return self.seen

    def advance(self, valid: torch.Tensor) -> None:
        """Record a forward over ``valid`` ``[B, T]`` (False: padding)."""
        self.num_tokens += valid.shape[1]
        self.seen = self.start_positions(valid.shape[0], valid.device) + valid.sum(1)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.seen is not None:
            self.seen = self.seen[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.seen is not None:
            self.seen = self.seen[beam_idx.to(self.seen.device)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.seen is not None:
            self.seen = self.seen.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        super().reset()
        self.num_tokens, self.seen = 0, None
