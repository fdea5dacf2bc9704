"""The MoD plugin inside the real vLLM engine (CPU), against the reference model and vLLM's Llama.

Models: the default SmolLM2-135M made MoD, in float32, with routers calibrated so that about half
of the tokens skip each of the 15 routed layers (``half_skip_model_dir``), or routed all-in.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mod_serve.vllm_internals import cdiv
from tests.conftest import EMPTY_LAYER
from tests.vllm_helpers import (
    BLOCK_SIZE,
    COMPILED,
    free_blocks,
    greedy,
    inproc_llm,
    metric,
    mixed_prompts,
    reference_generate,
    routed_managers,
    scheduler,
    token_ids,
    worker,
)

pytestmark = pytest.mark.slow
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts(half_skip_model_dir):
    return mixed_prompts(AutoTokenizer.from_pretrained(half_skip_model_dir), 16)


@pytest.fixture(scope="module")
def reference(half_skip_model_dir, prompts):
    return reference_generate(half_skip_model_dir, prompts, MAX_TOKENS)


def _tokens_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def test_batch_matches_reference_tokens_and_routed_counts(half_skip_model_dir, prompts, reference):
    want, want_routed = reference
    with inproc_llm(str(half_skip_model_dir), **COMPILED) as llm:
        pool = free_blocks(llm)
        got = token_ids(llm.generate(_tokens_prompts(prompts), greedy(MAX_TOKENS)))
        stats = llm.collective_rpc("mod_kv_stats")[0]
        assert free_blocks(llm) == pool  # every block back in the pool
    assert got == want
    assert {int(k): v for k, v in stats["routed_tokens"].items()} == want_routed
    total = sum(len(p) + MAX_TOKENS - 1 for p in prompts)
    assert stats["tokens_seen"] == total
    assert want_routed.pop(EMPTY_LAYER) == 0  # a routed layer that receives zero tokens
    assert all(0.25 < v / total < 0.75 for v in want_routed.values()), want_routed  # about half skip


def test_block_accounting_step_by_step_with_aborts(half_skip_model_dir, prompts):
    with inproc_llm(str(half_skip_model_dir)) as llm:
        engine = llm.llm_engine
        pool = free_blocks(llm)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, greedy(20))
        state = worker(llm).model_runner.model.routing_state
        batch = worker(llm).model_runner.input_batch
        managers = routed_managers(llm)
        saved_blocks, steps = 0, 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            if steps == 3:
                engine.abort_request(["r1", "r4", "r9"])
            for layer, m in managers.items():
                slot = state.slot[layer]
                table = batch.block_table[state.group_of_layer[layer]]
                for rid, blocks in m.req_to_blocks.items():
                    if rid not in m.routed:
                        assert not blocks
                        continue
                    routed = state.counts[rid][1][slot]
                    assert m.routed[rid] == routed
                    assert len(blocks) == cdiv(routed, BLOCK_SIZE)
                    row = batch.req_id_to_index[rid]
                    assert int(table.num_blocks_per_row[row]) == len(blocks)
                    assert table.block_table.cpu[row, : len(blocks)].tolist() == [b.block_id for b in blocks]
                    dense = cdiv(state.counts[rid][0], BLOCK_SIZE)
                    saved_blocks += dense - len(blocks)
        assert steps > 3 and saved_blocks > 0
        assert free_blocks(llm) == pool
        assert not any(m.req_to_blocks.get(r) for m in managers.values() for r in list(m.req_to_blocks))


@pytest.fixture(scope="module")
def sink_model_dir(half_skip_model_dir, tmp_path_factory):
    """The half-skip model with ``sink_tokens = 2``: its empty layer then holds exactly two
    tokens per request."""
    import json
    import shutil

    dst = tmp_path_factory.mktemp("sink") / "mod"
    shutil.copytree(half_skip_model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    config["mod"]["sink_tokens"] = 2
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_sink_tokens_routed_in_like_the_reference(sink_model_dir, prompts):
    subset = prompts[:8]
    want, want_routed = reference_generate(sink_model_dir, subset, MAX_TOKENS)
    with inproc_llm(str(sink_model_dir)) as llm:
        engine = llm.llm_engine
        for i, p in enumerate(subset):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, greedy(MAX_TOKENS))
        engine.step()  # prefill: the empty layer keeps one block per request, for its two sinks
        empty = routed_managers(llm)[EMPTY_LAYER]
        held = {r: (empty.routed[r], len(b)) for r, b in empty.req_to_blocks.items() if b}
        assert held and set(held.values()) == {(2, 1)}, held
        got = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = list(out.outputs[0].token_ids)
        stats = llm.collective_rpc("mod_kv_stats")[0]
    assert [got[f"r{i}"] for i in range(len(subset))] == want
    assert {int(k): v for k, v in stats["routed_tokens"].items()} == want_routed
    assert want_routed[EMPTY_LAYER] == 2 * len(subset)


def test_all_routed_in_equals_vllm_llama(all_in_model_dir, dense_f32_dir, prompts):
    with inproc_llm(str(dense_f32_dir), **COMPILED) as llm:
        want = token_ids(llm.generate(_tokens_prompts(prompts), greedy(MAX_TOKENS)))
    with inproc_llm(str(all_in_model_dir), **COMPILED) as llm:
        got = token_ids(llm.generate(_tokens_prompts(prompts), greedy(MAX_TOKENS)))
        stats = llm.collective_rpc("mod_kv_stats")[0]
    assert got == want
    assert set(stats["routed_tokens"].values()) == {stats["tokens_seen"]}


def test_chunked_prefill_matches_reference(half_skip_model_dir, prompts, reference):
    want, _ = reference
    # chunks of at most 64 tokens: most prompts are split inside, several requests per step
    with inproc_llm(str(half_skip_model_dir), max_num_batched_tokens=64, enable_chunked_prefill=True,
                    max_num_seqs=8) as llm:
        got = token_ids(llm.generate(_tokens_prompts(prompts), greedy(MAX_TOKENS)))
        assert free_blocks(llm) == scheduler_pool(llm)
    assert got == want


def scheduler_pool(llm) -> int:
    return scheduler(llm).kv_cache_manager.block_pool.num_gpu_blocks - 1  # minus vLLM's null block


def run_under_budget(llm, load, max_tokens: int) -> tuple[list[list[int]], int]:
    """Outputs in request order and the most requests vLLM ran at once."""
    engine, peak, got = llm.llm_engine, 0, {}
    for i, p in enumerate(load):
        engine.add_request(f"r{i}", p, greedy(max_tokens))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
        peak = max(peak, len(scheduler(llm).running))
    return [got[f"r{i}"] for i in range(len(load))], peak


def test_mod_runs_more_requests_than_dense_under_one_kv_budget(half_skip_model_dir, dense_f32_dir, prompts, reference):
    """One KV budget in bytes, too small for the whole load, the same engine settings for both
    (prefix caching off: the prompts share no prefix): MoD's smaller routed-layer caches let vLLM
    run more requests at once, it is preempted and resumes, and its outputs stay the reference's."""
    want, _ = reference
    # 40 MiB of float32 KV: 1.7 max-length (512-token) requests in the worst case (all routed in),
    # about 830 tokens per layer, while the load needs about 16 x 200
    budget, max_len = 40 << 20, 512
    load = _tokens_prompts(prompts)
    settings = dict(kv_cache_memory_bytes=budget, max_model_len=max_len, enable_prefix_caching=False)
    with inproc_llm(str(dense_f32_dir), **settings) as llm:
        _, dense_peak = run_under_budget(llm, load, 48)
        dense_preemptions = metric(llm, "vllm:num_preemptions")
    with inproc_llm(str(half_skip_model_dir), **settings) as llm:
        outs, mod_peak = run_under_budget(llm, load, 48)
        mod_preemptions = metric(llm, "vllm:num_preemptions")
        assert free_blocks(llm) == scheduler_pool(llm)
    print(f"peak running: dense {dense_peak}, MoD {mod_peak}; preemptions: dense {dense_preemptions}, MoD {mod_preemptions}")
    assert dense_preemptions > 0 and mod_preemptions > 0  # the budget binds for both
    assert mod_peak > dense_peak
    assert [o[:MAX_TOKENS] for o in outs] == want


def test_default_model_routes_identically_in_reference_and_vllm(default_model_dir, prompts):
    """The shipped default: trained routers and the merged adapter, as `mod-serve serve` loads it."""
    subset = prompts[:8]
    want, want_routed = reference_generate(default_model_dir, subset, MAX_TOKENS)
    with inproc_llm(str(default_model_dir), **COMPILED) as llm:
        got = token_ids(llm.generate(_tokens_prompts(subset), greedy(MAX_TOKENS)))
        stats = llm.collective_rpc("mod_kv_stats")[0]
    assert got == want
    assert {int(k): v for k, v in stats["routed_tokens"].items()} == want_routed
    total = sum(len(p) + MAX_TOKENS - 1 for p in subset)
    assert min(want_routed.values()) < total  # the trained routers do skip tokens
