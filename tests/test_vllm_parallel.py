"""Tensor parallelism through vLLM's own multiprocess executor (CPU, 2 ranks, float32).

SmolLM2-135M's 9 attention heads cannot be split in 2, so the model is a small random LLaMA with
4 query / 2 KV heads, every other layer routed, half of the tokens skipping. On this one-NUMA-node
machine each rank gets one core through ``VLLM_CPU_OMP_THREADS_BIND="0|1"``.
"""

from __future__ import annotations

import pytest

from mod_serve.inproc import llm_session
from tests.test_vllm_layouts import MAX_TOKENS, random_prompts, run_engine, small_mod_dir
from tests.vllm_helpers import greedy, reference_generate, token_ids

pytestmark = pytest.mark.slow


def tp_llm(model_dir, tp: int):
    return llm_session(str(model_dir), tensor_parallel_size=tp, distributed_executor_backend="mp", dtype="float32",
                       skip_tokenizer_init=True, max_model_len=512, block_size=32, kv_cache_memory_bytes=64 << 20,
                       seed=0, max_num_seqs=32, enforce_eager=True)  # compiling on both ranks costs minutes here


def test_tensor_parallel_2_equals_tp1_and_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    model_dir = small_mod_dir(tmp_path, [1, 3, 5], seed=3)
    prompts = random_prompts(seed=5)
    want, want_routed = reference_generate(model_dir, prompts, MAX_TOKENS)
    tp1, tp1_stats, _, _ = run_engine(model_dir, prompts)
    with tp_llm(model_dir, 2) as llm:
        got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(MAX_TOKENS)))
        stats = llm.collective_rpc("mod_kv_stats")
    assert got == tp1 == want
    assert [s["tp_rank"] for s in stats] == [0, 1]
    for s in stats:  # every rank routed (and so trimmed) exactly like the reference
        assert {int(k): v for k, v in s["routed_tokens"].items()} == want_routed
        assert s["routed_kv_blocks"] == 0 and s["free_kv_blocks"] == s["total_kv_blocks"]
    assert tp1_stats["routed_tokens"] == stats[0]["routed_tokens"]
    assert all(0 < n < stats[0]["tokens_seen"] for n in want_routed.values())
