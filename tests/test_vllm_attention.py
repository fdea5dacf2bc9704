"""The backend-generic routed attention call: the compact metadata it hands to the layer's own
vLLM metadata builder, recorded from a real engine run (CPU, float32), and FlashAttention's
builder fed the very same compact input on this CPU (its kernel cannot run here)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_vllm_layouts import MAX_TOKENS, random_prompts, small_mod_dir
from tests.vllm_helpers import greedy, inproc_llm, worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every compact CommonAttentionMetadata built during a batch with chunked prefill, the
    engine's vllm_config, and the routed layers' KV specs. The Python path, as on a machine
    without the C++ routed ops (``cpu_decode.bind`` returns None), which
    tests/test_vllm_cpu_decode.py checks against the C++ one."""
    from unittest import mock

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from mod_serve.vllm_internals import cpu_decode, routed_backend

    builder_cls = routed_backend(CPUAttentionBackend).get_builder_cls()
    original = builder_cls.build_compact
    calls = []

    def record(self, cm):
        md = original(self, cm)
        # the block table is a view of the live table, rewritten by later steps: keep a copy
        calls.append((self.kv_cache_spec, dataclasses.replace(cm, block_table_tensor=cm.block_table_tensor.clone()), md))
        return md

    model_dir = small_mod_dir(tmp_path_factory.mktemp("attn"), [0, 2, 3, 5])
    builder_cls.build_compact = record
    try:
        with mock.patch.object(cpu_decode, "bind", return_value=None), inproc_llm(str(model_dir), skip_tokenizer_init=True, max_model_len=512, max_num_batched_tokens=64,
                        enable_chunked_prefill=True) as llm:
            llm.generate([{"prompt_token_ids": p} for p in random_prompts()], greedy(MAX_TOKENS))
            runner = worker(llm).model_runner
            vllm_config = runner.vllm_config
            kernels = [(m.mod_cpu_kernels, m.kv_cache) for m in runner.model.modules() if hasattr(m, "mod_cpu_kernels")]
    finally:
        builder_cls.build_compact = original
    return calls, vllm_config, kernels


def test_routed_layers_call_the_cpu_kernels_on_their_own_caches(recorded):
    """On the CPU each routed layer binds vLLM's two attention kernels once (CpuAttentionKernels)
    to views of its own KV cache; the tokens this path produces are checked in test_vllm_plugin."""
    from mod_serve.vllm_internals.attention import CpuAttentionKernels

    kernels = recorded[2]
    assert len(kernels) == 4  # routed layers 0, 2, 3, 5
    for bound, kv_cache in kernels:
        assert isinstance(bound, CpuAttentionKernels) and bound.kv_cache is kv_cache
        for view in (bound.key_cache, bound.value_cache):
            assert view.untyped_storage().data_ptr() == kv_cache.untyped_storage().data_ptr()
        assert bound.key_cache.shape == bound.value_cache.shape
        assert bound.key_cache.shape[2] == kv_cache.shape[2]  # block size: K and V halves of each block


def test_compact_metadata_is_consistent(recorded):
    calls, _, _ = recorded
    assert len(calls) > 20
    prefill_chunks = 0
    for spec, cm, md in calls:
        n, R = cm.num_actual_tokens, cm.num_reqs
        qsl, seq_lens = cm.query_start_loc, cm.seq_lens
        new = qsl[1:] - qsl[:-1]
        assert qsl[0] == 0 and qsl[-1] == n == cm.slot_mapping.numel()
        assert (new >= 0).all() and (seq_lens >= new).all()
        assert int(new.max()) <= cm.max_query_len and int(seq_lens.max()) <= cm.max_seq_len  # host upper bounds
        prefill_chunks += int((new > 1).any())
        # each routed token's slot lies in its own request's blocks, at its compact index
        B = spec.block_size
        for r in range(R):
            start, count = int(qsl[r]), int(new[r])
            compact = torch.arange(int(seq_lens[r]) - count, int(seq_lens[r]))
            want = cm.block_table_tensor[r, compact // B].long() * B + compact % B
            assert cm.slot_mapping[start : start + count].tolist() == want.tolist()
        assert len(set(cm.slot_mapping.tolist())) == n
        assert md.slot_mapping is cm.slot_mapping and md.seq_lens is cm.seq_lens  # the CPU builder's output
        assert md.scheduler_metadata is not None
    assert prefill_chunks > 0


def test_flash_attention_builder_accepts_the_compact_metadata(recorded):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    from mod_serve.vllm_internals import routed_backend

    calls, vllm_config, _ = recorded
    backend = routed_backend(FlashAttentionBackend)
    assert issubclass(backend, FlashAttentionBackend)
    builders = {}
    for spec, cm, _ in calls:
        if spec.layer_index not in builders:
            name = f"model.layers.{spec.layer_index}.self_attn.attn"
            builders[spec.layer_index] = backend.get_builder_cls()(spec, [name], vllm_config, torch.device("cpu"))
        md = builders[spec.layer_index].build_compact(cm)
        assert type(md).__name__ == "FlashAttentionMetadata"
        assert md.num_actual_tokens == cm.num_actual_tokens and md.max_query_len == cm.max_query_len
        assert md.query_start_loc is cm.query_start_loc and md.seq_lens is cm.seq_lens
        assert torch.equal(md.block_table, cm.block_table_tensor) and md.slot_mapping is cm.slot_mapping
        assert md.causal
