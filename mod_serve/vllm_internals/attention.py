"""Attention seam: one backend-generic routed attention call.

A routed layer's ``Attention`` keeps its backend impl and KV cache; only two things change:

* its KV spec is a ``RoutedAttentionSpec`` (its own KV cache group, see ``kv``);
* its backend's metadata builder is wrapped (``routed_backend``): the runner's per-step
  ``build()`` just keeps the group's ``CommonAttentionMetadata`` (block table, no kernel-side
  work), and the layer, once it knows its routed tokens, builds a *compact*
  ``CommonAttentionMetadata`` (its tokens only, over its compact per-request sequence) and
  hands it to the same builder's real ``build()``.

Then the layer's backend impl runs with that metadata, as ``Attention.forward`` would run it: its
cache write (``do_kv_cache_update``, unless the backend's kernel writes the cache itself) and its
kernel (``impl.forward``), on the layer's own KV cache (CPU_ATTN on CPU, FlashAttention on CUDA),
so nothing here depends on a backend's metadata type or KV cache layout. One exception, for speed:
with vLLM's CPU impl (decoder self-attention) the same two C++ kernels are called directly with
the layer's constant arguments bound once (``CpuAttentionKernels``); any other impl runs as above.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec

from . import cpu_decode
from .kv import RoutedAttentionSpec
from .routing import RoutingStep


@dataclasses.dataclass
class RoutedStepMetadata:
    """What the runner's per-step build leaves for a routed layer: its group's common metadata
    (block table already in kernel blocks) and the builder that makes the compact metadata."""

    builder: object
    common: CommonAttentionMetadata


def _with_builder(backend_cls, builder_cls, tag: str):
    """A subclass of ``backend_cls`` whose metadata builder is ``builder_cls``."""

    class Backend(backend_cls):
        @staticmethod
        def get_builder_cls():
            return builder_cls

    builder_cls.__name__ = f"{tag}{backend_cls.get_builder_cls().__name__}"
    Backend.__name__ = f"{tag}{backend_cls.__name__}"
    return Backend


def _cpu_update_block_table(self, metadata, blk_table, slot_mapping):
    """``update_block_table`` for vLLM's CPU builder, as FlashAttention's builder has it: the
    CPU metadata depends on block table and slots only by carrying them (a shallow copy with
    the two fields set: ``dataclasses.replace`` would run ``__init__`` again, and ``copy.copy``
    goes through ``__reduce_ex__``)."""
    shared, metadata = metadata, object.__new__(type(metadata))
    metadata.__dict__.update(shared.__dict__)
    metadata.block_table = blk_table
    metadata.slot_mapping = slot_mapping
    return metadata


def _can_share(backend_cls) -> bool:
    """Whether metadata built for one KV cache group can serve another with the same sequence
    lengths (vLLM's ``update_block_table``), natively or through the CPU addition above."""
    return backend_cls.get_builder_cls().supports_update_block_table or backend_cls.get_name() == "CPU_ATTN"


@functools.cache
def routed_backend(backend_cls):
    """``backend_cls`` with its metadata builder wrapped as described in the module docstring."""
    base = backend_cls.get_builder_cls()

    class RoutedMetadataBuilder(base):
        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            return RoutedStepMetadata(self, common_attn_metadata)

        def build_compact(self, common_attn_metadata):
            return base.build(self, 0, common_attn_metadata)

    if _can_share(backend_cls) and not base.supports_update_block_table:
        RoutedMetadataBuilder.supports_update_block_table = True
        RoutedMetadataBuilder.update_block_table = _cpu_update_block_table
    return _with_builder(backend_cls, RoutedMetadataBuilder, "Routed")


@functools.cache
def shared_metadata_backend(backend_cls):
    """vLLM's CPU backend whose builder lets full-attention KV cache groups share one metadata build
    (``update_block_table``, as FlashAttention's builder already does): a MoD model's unrouted
    layers form one 1-layer group each, whose metadata differ only in block table and slots."""
    base = backend_cls.get_builder_cls()
    if base.supports_update_block_table or not _can_share(backend_cls):
        return backend_cls

    class SharedMetadataBuilder(base):
        supports_update_block_table = True
        update_block_table = _cpu_update_block_table

    return _with_builder(backend_cls, SharedMetadataBuilder, "Shared")


def make_attention_routed(attn, layer_index: int) -> None:
    """Make a vLLM ``Attention`` module report a ``RoutedAttentionSpec`` and build its metadata
    per routed token set. It keeps its impl, cache binding and forward-context registration."""

    def get_kv_cache_spec(vllm_config):
        spec = type(attn).get_kv_cache_spec(attn, vllm_config)
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(AttentionSpec) if f.init}
        return RoutedAttentionSpec(**fields, layer_index=layer_index)

    if attn.query_quant is not None or attn.kv_sharing_target_layer_name is not None:
        raise NotImplementedError("mod-serve: routed layers support neither fp8 query quantisation nor KV sharing")
    attn.get_kv_cache_spec = get_kv_cache_spec
    attn.routed_layer_index = layer_index
    attn.attn_backend = routed_backend(attn.attn_backend)
    attn.mod_cpu_kernels = None  # bound at the first routed attention call (CpuAttentionKernels)


@dataclasses.dataclass(slots=True)
class LayerStep:
    """One routed layer's per-step constants on the CPU, computed for every routed layer at the
    step's first routed attention call (one warm loop instead of a dozen lookups and small array
    operations in each layer between its GEMMs)."""

    builder: object
    block_table: torch.Tensor  # [num_reqs, blocks] in kernel blocks
    block_size: int  # the kernel's block size
    prior: torch.Tensor | None = None  # this layer's row of the step's prior counts (CPU, int64)
    new: torch.Tensor | None = None  # this layer's row of the step's new counts (written)
    # Decode steps: the slots if every request's token is routed in. A routed token's compact
    # index is then its request's prior count, whatever the other requests do, so ``slots[idx]``
    # are the slots of any routed subset. The all-in metadata is built at first use.
    decode_slots: torch.Tensor | None = None
    decode_metadata: object = None


def _layer_steps(step: RoutingStep) -> dict[int, LayerStep]:
    md_of = get_forward_context().attn_metadata
    priors, news = step.prior.unbind(0), step.new.unbind(0)
    out = {}
    for slot, name in step.attn_names.items():
        step_md: RoutedStepMetadata = md_of[name]
        builder = step_md.builder
        out[slot] = LayerStep(builder, step_md.common.block_table_tensor[: step.num_reqs],
                              builder.kv_cache_spec.block_size, priors[slot], news[slot])
    return out


def _decode_slots(step: RoutingStep, slot: int, ls: LayerStep) -> torch.Tensor:
    """A decode step's slots of one routed layer if every request's token is routed in."""
    if ls.decode_slots is None:
        rows, column, offset, _ = step.decode_host(ls.block_size)
        ls.decode_slots = torch.from_numpy(ls.block_table.numpy()[rows, column[slot]] * np.int64(ls.block_size)
                                           + offset[slot])
    return ls.decode_slots


def _metadata(step: RoutingStep, slot: int, ls: LayerStep, n: int, slots, seq_lens, qsl, key: tuple | None):
    """The compact metadata of a routed layer. Routed layers whose compact sequences agree this
    step (every layer, when every token is routed in) share one build, as vLLM's full-attention
    groups do (``update_block_table``); ``key`` is the compact sequences' content."""
    builder = ls.builder
    if key is not None and builder.supports_update_block_table:
        key = (_share_key(builder), *key)
        shared = step.metadata_memo.get(key)
        if shared is not None:
            return builder.update_block_table(shared, ls.block_table, slots)
    else:
        key = None
    metadata = builder.build_compact(CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl if qsl.device.type == "cpu" else qsl.to("cpu", non_blocking=True),
        seq_lens=seq_lens,
        num_reqs=step.num_reqs,
        num_actual_tokens=n,
        max_query_len=step.max_query_len,
        max_seq_len=step.max_seq_len[slot],
        block_table_tensor=ls.block_table,
        slot_mapping=slots,
        causal=True,
    ))
    if key is not None:
        step.metadata_memo[key] = metadata
    return metadata


def routed_attention(attn, step: RoutingStep, slot: int, routed_idx: torch.Tensor, q, k, v) -> torch.Tensor:
    """Attention for the routed tokens of one layer over its compact per-request KV cache.

    ``routed_idx`` are the indices (into this step's tokens) of the tokens routed into the layer;
    q/k/v are theirs, RoPE already applied at true positions. Token j of request r is the
    ``prior[r] + rank``-th token of r's compact sequence, stored in slot ``compact % B`` of block
    ``block_table[r, compact // B]``; the compact metadata has this step's routed tokens as
    queries and ``prior + new`` tokens per request as context. No host sync: maxima are host-side
    upper bounds.
    """
    n = routed_idx.numel()
    if q.device.type == "cpu":
        layer_steps = step.layer_steps
        if layer_steps is None:
            layer_steps = step.layer_steps = _layer_steps(step)
        ls = layer_steps[slot]
        kernels = attn.mod_cpu_kernels
        if kernels is None or (kernels and kernels.kv_cache is not attn.kv_cache):
            kernels = attn.mod_cpu_kernels = CpuAttentionKernels.bind(attn, ls.builder)
            if kernels and kernels.compact is not None:  # later steps: straight from the graph
                cpu_decode.extension().bind_layer(attn.mod_op_name, slot, kernels.compact)
        if kernels and kernels.compact is not None:  # the C++ call (``cpu_decode``)
            return kernels.compact(q, k, v, routed_idx, step.cpu_token_req(), ls.prior, ls.new, ls.block_table)
        out = torch.empty(n, attn.num_heads, attn.head_size_v, dtype=q.dtype, device=q.device)
        slots, metadata = _compact_host(step, slot, routed_idx, ls)
        if kernels:
            kernels(q, k, v, slots, metadata, out)
            return out.view(n, attn.num_heads * attn.head_size_v)
    else:
        out = torch.empty(n, attn.num_heads, attn.head_size_v, dtype=q.dtype, device=q.device)
        step_md: RoutedStepMetadata = get_forward_context().attn_metadata[attn.layer_name]
        ls = LayerStep(step_md.builder, step_md.common.block_table_tensor[: step.num_reqs],
                       step_md.builder.kv_cache_spec.block_size, None)
        slots, seq_lens, qsl = _compact_device(step, slot, routed_idx, ls.block_table, ls.block_size)
        metadata = _metadata(step, slot, ls, n, slots, seq_lens, qsl, None)
    # What Attention.forward does (shape views, the backend's cache write unless its kernel writes
    # the cache itself, the backend's kernel), minus its custom-op dispatch and forward-context
    # lookups (~100 us per call here); make_attention_routed checked that no query quantisation
    # or KV sharing is in play.
    impl = attn.impl
    q = q.view(n, attn.num_heads, attn.head_size)
    k = k.view(n, attn.num_kv_heads, attn.head_size)
    v = v.view(n, attn.num_kv_heads, attn.head_size_v)
    if not attn.attn_backend.forward_includes_kv_cache_update:
        impl.do_kv_cache_update(attn, k, v, attn.kv_cache, slots)
    impl.forward(attn, q, k, v, attn.kv_cache, metadata, output=out)
    return out.view(n, attn.num_heads * attn.head_size_v)


class CpuAttentionKernels:
    """vLLM's CPU attention for one routed layer (``CPUAttentionBackendImpl.do_kv_cache_update``
    then ``forward``, decoder self-attention) as its two C++ kernels with the layer's constant
    arguments bound once: the same kernels and arguments, without ~20 Python operations per call
    (~50 us each time here, once a layer's weights have streamed through the caches).
    ``bind`` returns False where the layer's impl is not exactly that case (another backend,
    attention sinks in a dtype the impl would convert); the layer remembers it and calls the impl
    as ``Attention.forward`` would. It binds again if the layer's KV cache tensor is replaced."""

    @classmethod
    def bind(cls, attn, builder=None):
        from vllm.v1.attention.backend import AttentionType
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder

        impl = attn.impl
        if (type(impl) is not CPUAttentionBackendImpl or impl.attn_type != AttentionType.DECODER
                or (impl.sinks is not None and impl.sinks.dtype not in (torch.bfloat16, torch.float32))):
            return False
        kernels = cls(attn)
        # the C++ call reproduces vLLM's own CPU build, which is what the routed wrapper runs
        if builder is not None and type(builder).__bases__ == (CPUAttentionMetadataBuilder,):
            kernels.compact = cpu_decode.bind(kernels, builder)  # the whole call in C++, if built
        return kernels

    def __init__(self, attn):
        impl = attn.impl
        self.kv_cache = attn.kv_cache
        num_blocks, num_kv_heads, block_size, _ = self.kv_cache.size()
        kv = self.kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1))
        self.key_cache, self.value_cache = kv.chunk(2, dim=2)
        self.shape = (attn.num_heads, attn.head_size), (attn.num_kv_heads, attn.head_size), (attn.num_kv_heads, attn.head_size_v)
        self.isa, self.k_scale, self.v_scale = attn.isa, attn._k_scale_float, attn._v_scale_float
        self.dtype, self.scale, self.alibi_slopes = impl.kv_cache_dtype, impl.scale, impl.alibi_slopes
        self.sliding_window, self.softcap, self.sinks = impl.sliding_window, impl.logits_soft_cap, impl.sinks
        self.compact = None

    def __call__(self, q, k, v, slots, metadata, out) -> None:
        n = q.shape[0]
        (hq, dq), (hk, dk), (hv, dv) = self.shape
        k, v = k.view(n, hk, dk), v.view(n, hv, dv)
        torch.ops._C.cpu_attn_reshape_and_cache(k, v, self.key_cache, self.value_cache, slots, self.isa,
                                                self.k_scale, self.v_scale, self.dtype)
        torch.ops._C.cpu_attention_with_kv_cache(
            q.view(n, hq, dq), self.key_cache, self.value_cache, out, metadata.query_start_loc,
            metadata.seq_lens, self.scale, metadata.causal, self.alibi_slopes, self.sliding_window,
            metadata.block_table, self.softcap, metadata.scheduler_metadata, self.sinks,
            metadata.dynamic_causal, self.k_scale, self.v_scale, self.dtype)


_NO_TABLE = torch.empty(0, 0, dtype=torch.int32)


def step_block_tables(step: RoutingStep, num_slots: int) -> list[torch.Tensor]:
    """Each routed slot's block table this step (from its group's metadata; empty for layers on
    another pipeline stage), for the C++ decode attention."""
    md_of = get_forward_context().attn_metadata
    tables = [_NO_TABLE] * num_slots
    for slot, name in step.attn_names.items():
        tables[slot] = md_of[name].common.block_table_tensor
    return tables


def _share_key(builder):
    """What a builder's output depends on besides the compact sequences: its class and KV spec
    (the layer index aside)."""
    key = getattr(builder, "_mod_share_key", None)
    if key is None:
        key = builder._mod_share_key = (type(builder), dataclasses.replace(builder.kv_cache_spec, layer_index=-1))
    return key


def _compact_device(step: RoutingStep, slot: int, routed_idx, block_table, block_size: int):
    """(slots, seq_lens, query_start_loc) of the routed tokens, computed on the model's device."""
    num_reqs, device = step.num_reqs, routed_idx.device
    prior = step.prior[slot]
    if step.is_decode:  # token i is request i's only token: its compact index is prior[i]
        rows = routed_idx
        new = torch.zeros_like(prior).index_fill_(0, routed_idx, 1)
        compact = prior[rows]
        ends = torch.cumsum(new, 0)
    else:
        rows = step.token_req[routed_idx]
        new = torch.bincount(rows, minlength=num_reqs)
        ends = torch.cumsum(new, 0)
        rank = torch.arange(routed_idx.numel(), device=device) - (ends - new)[rows]
        compact = prior[rows] + rank
    step.new[slot] = new
    slots = block_table[rows, compact // block_size].to(torch.int64) * block_size + compact % block_size
    qsl = torch.zeros(num_reqs + 1, dtype=torch.int32, device=device)
    qsl[1:] = ends
    return slots, (prior + new).to(torch.int32), qsl


def _compact_host(step: RoutingStep, slot: int, routed_idx, ls: LayerStep):
    """(slots, compact metadata) of the routed tokens, compacted in numpy on the CPU (the
    tensors share memory with the arrays): a handful of array operations instead of a dozen
    small torch ops per routed layer and step."""
    new = step.new_host[slot]  # this layer's row, filled in place
    n = routed_idx.shape[0]
    if step.is_decode:  # token i is request i's only token: its compact index is prior[i]
        slots = _decode_slots(step, slot, ls)
        if n == step.num_reqs:  # every request's token routed in
            new[:] = 1
            if ls.decode_metadata is None:
                seq_lens = step.decode_host(ls.block_size)[3][slot]
                key = (n, step.max_seq_len[slot], seq_lens.numpy().tobytes(), None)
                ls.decode_metadata = _metadata(step, slot, ls, n, slots, seq_lens, step.all_in_qsl(), key)
            return slots, ls.decode_metadata
        idx = routed_idx.numpy()
        new[idx] = 1
        slots = torch.from_numpy(slots.numpy()[idx])
    else:
        idx = routed_idx.numpy()
        rows = step.token_req_host[idx]
        new[:] = np.bincount(rows, minlength=step.num_reqs)
        starts = np.cumsum(new) - new
        compact = step.prior_host[slot][rows] + np.arange(idx.size) - starts[rows]
        bs = ls.block_size
        slots = torch.from_numpy(ls.block_table.numpy()[rows, compact // bs].astype(np.int64) * bs + compact % bs)
    qsl = np.zeros(step.num_reqs + 1, dtype=np.int32)
    np.cumsum(new, out=qsl[1:])
    seq_lens = (step.prior_host[slot] + new).astype(np.int32)
    key = (n, step.max_seq_len[slot], seq_lens.tobytes(), qsl.tobytes())
    return slots, _metadata(step, slot, ls, n, slots, torch.from_numpy(seq_lens), torch.from_numpy(qsl), key)
