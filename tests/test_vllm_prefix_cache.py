"""Prefix caching for routed (MoD) layers in the real vLLM engine (CPU, float32).

A small random LLaMA made MoD (routed layers 1, 2, 3, 5; about half of the tokens skip each,
no sink token, so a routed layer can hold nothing for a prefix). Design: see
``mod_serve.vllm_internals.prefix_cache``. Checked here: greedy tokens and per-request,
per-layer routed counts equal to the reference with caching on and off; hit lengths
(``num_cached_tokens`` and vLLM's prefix-cache metrics); restored counts and compact KV equal to
the producer's; eviction of one routed block; preemption and chunked prefill with caching on;
``reset_prefix_cache``; the per-request threshold in the cache key; the per-request ``mod``
figures on the RequestOutput.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from vllm import SamplingParams

from mod_serve.vllm_internals import cdiv
from tests.test_vllm_layouts import SMALL, small_mod_dir
from tests.vllm_helpers import COMPILED, BLOCK_SIZE, free_blocks, inproc_llm, metric, routed_managers, scheduler, worker

pytestmark = pytest.mark.slow

B = BLOCK_SIZE
ROUTED = [1, 2, 3, 5]
VOCAB = SMALL["vocab_size"]


def rand_tokens(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def params(max_tokens=8, p=None):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=None if p is None else {"mod_threshold": p})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return small_mod_dir(tmp_path_factory.mktemp("pc") / "mod", ROUTED)


def at_threshold(model_dir, p):
    dst = model_dir.parent / f"p{p}"
    if not dst.exists():
        shutil.copytree(model_dir, dst)
        config = json.loads((dst / "config.json").read_text())
        config["mod"]["threshold"] = p
        (dst / "config.json").write_text(json.dumps(config))
    return dst


class Reference:
    """The reference model (mod_serve.modeling): greedy tokens, routed counts, routing masks."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(self, prompt, max_tokens):
        import mod_serve

        with torch.no_grad():
            return mod_serve.greedy_generate(self.model, prompt, max_tokens)

    def counts_at(self, tokens, n):
        """Tokens among the first n routed into each routed layer."""
        with torch.no_grad():
            out = self.model(torch.tensor([tokens[:n]]))
        return {layer: int(m.sum()) for layer, m in out.routed_masks.items()}


@pytest.fixture(scope="module")
def reference(model_dir):
    return Reference(model_dir)


@pytest.fixture(scope="module")
def llm(model_dir):
    with inproc_llm(str(model_dir), skip_tokenizer_init=True, max_model_len=512) as llm:
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching  # on by default
        yield llm


def fresh(llm):
    assert scheduler(llm).reset_prefix_cache()
    assert not scheduler(llm).mod_index.entries


def run(llm, prompts, max_tokens=8, p=None):
    outs = llm.generate([{"prompt_token_ids": q} for q in prompts], params(max_tokens, p), use_tqdm=False)
    return outs


def routed_counts(out) -> dict[int, int]:
    """Per-layer routed tokens of a finished request, from its ``mod`` figures."""
    mod = out.kv_transfer_params["mod"]
    n = len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1
    return {int(layer): round(f * n) for layer, f in mod["routed_fraction"].items()}


def check_against_reference(reference, prompts, outs, max_tokens):
    for q, o in zip(prompts, outs):
        tokens, counts = reference.generate(q, max_tokens)
        assert list(o.outputs[0].token_ids) == tokens
        assert routed_counts(o) == counts


def expected_hit(length):
    return (length - 1) // B * B


# ---------------------------------------------------------------------------------------------
def test_prompt_sent_twice_hits_and_equals_reference(llm, reference):
    fresh(llm)
    prompts = [rand_tokens(n, seed=n) for n in (33, 64, 65, 97, 200)]
    hits0, queries0 = metric(llm, "vllm:prefix_cache_hits"), metric(llm, "vllm:prefix_cache_queries")
    first = run(llm, prompts)
    assert [o.num_cached_tokens for o in first] == [0] * len(prompts)
    second = run(llm, prompts)
    assert [o.num_cached_tokens for o in second] == [expected_hit(len(q)) for q in prompts]
    assert metric(llm, "vllm:prefix_cache_hits") - hits0 == sum(expected_hit(len(q)) for q in prompts)
    assert metric(llm, "vllm:prefix_cache_queries") - queries0 == 2 * sum(len(q) for q in prompts)
    check_against_reference(reference, prompts, first, 8)
    check_against_reference(reference, prompts, second, 8)
    # the per-request figures: KV the routed layers held at the end, against dense
    spec = next(iter(routed_managers(llm).values())).kv_cache_spec
    for q, o in zip(prompts, second):
        mod = o.kv_transfer_params["mod"]
        n = len(q) + 8 - 1
        assert mod["threshold"] == 0.5
        assert mod["kv_bytes"] == sum(cdiv(r, B) for r in routed_counts(o).values()) * spec.page_size_bytes
        assert mod["dense_kv_bytes"] == len(ROUTED) * cdiv(n, B) * spec.page_size_bytes
        assert mod["kv_bytes"] < mod["dense_kv_bytes"]
    assert free_blocks(llm) == scheduler(llm).kv_cache_manager.block_pool.num_gpu_blocks - 1


def test_shared_system_prompt_and_multi_turn_follow_up(llm, reference):
    fresh(llm)
    system = rand_tokens(100, seed=11)
    questions = [rand_tokens(n, seed=20 + n) for n in (5, 17, 40, 70)]
    first = run(llm, [system + questions[0]], max_tokens=40)[0]
    assert first.num_cached_tokens == 0
    prompts = [system + q for q in questions[1:]]
    outs = run(llm, prompts)  # one batch: each hits the shared system prompt, rounded down to B
    assert [o.num_cached_tokens for o in outs] == [100 // B * B] * len(prompts)
    check_against_reference(reference, prompts, outs, 8)
    # a follow-up turn hits past the first answer (boundaries crossed while decoding)
    turn1 = system + questions[0] + list(first.outputs[0].token_ids)
    follow = turn1 + rand_tokens(9, seed=5)
    out = run(llm, [follow])[0]
    computed = len(system + questions[0]) + 40 - 1  # the last sampled token was never fed back
    assert out.num_cached_tokens == computed // B * B > len(system + questions[0])
    check_against_reference(reference, [follow], [out], 8)


def kv_block(llm, layer, block_id):
    """The bytes of one KV block of a routed layer's cache (layout-agnostic)."""
    ctx = worker(llm).model_runner.compilation_config.static_forward_context
    cache = ctx[f"model.layers.{layer}.self_attn.attn"].kv_cache
    cache = cache[0] if isinstance(cache, (list, tuple)) else cache
    return cache[block_id].clone()


def test_restored_counts_and_compact_kv_equal_the_producers(llm, reference):
    fresh(llm)
    producer = rand_tokens(150, seed=7)
    run(llm, [producer], max_tokens=4)
    sched = scheduler(llm)
    index = sched.mod_index
    want = reference.counts_at(producer, 128)
    log = []
    schedule = sched.schedule

    def spy(*a, **k):
        out = schedule(*a, **k)
        log.append((dict(out.mod_restored), list(out.kv_cache_block_copies or ())))
        return out

    sched.schedule = spy
    engine = llm.llm_engine
    copies_seen = 0
    try:
        for last in (1, 2, 3):  # consumers: the 128-token prefix plus one other token
            consumer = producer[:128] + [(producer[128] + last) % VOCAB]
            engine.add_request(f"c{last}", {"prompt_token_ids": consumer}, params(max_tokens=2))
            rid = next(r for r in sched.requests if r.startswith(f"c{last}"))
            hashes = sched.requests[rid].block_hashes
            sources = {}  # what the lookup will give: the blocks of the entries at N = 128
            for layer, m in routed_managers(llm).items():
                hit = index.lookup(hashes, 128, m.kv_cache_group_id, B)
                assert hit.num_tokens == 128 and hit.routed == want[layer]
                sources[layer] = [(b.block_id, kv_block(llm, layer, b.block_id)) for b in hit.blocks]
            log.clear()
            engine.step()  # the consumer's first step: copy-on-write, then its token 128
            restored, copies = log[0]
            assert restored == {rid: (128, want)}  # r_i(N) = the producer's = the reference's
            copy_src = {dst: src for src, dst in copies}
            state = worker(llm).model_runner.model.routing_state
            for layer, m in routed_managers(llm).items():
                blocks, src, r = m.req_to_blocks[rid], sources[layer], want[layer]
                full = r // B
                # full blocks are the producer's own blocks (shared, never written again)
                assert [b.block_id for b in blocks[:full]] == [i for i, _ in src[:full]]
                for b, (_, data) in zip(blocks[:full], src[:full]):
                    assert torch.equal(kv_block(llm, layer, b.block_id), data)
                if r % B:  # the partial tail: a private copy of the entry's block, never that block
                    tail = blocks[full]
                    assert tail.block_id != src[full][0] and tail.ref_cnt == 1
                    assert copy_src[tail.block_id] == src[full][0]
                    copies_seen += 1
                    if state.counts[rid][1][state.slot[layer]] == r:  # the consumer's token skipped the layer
                        assert torch.equal(kv_block(llm, layer, tail.block_id), src[full][1])
                    # (else its slot r % B differs; slots below it are compared through the outputs)
            assert len(copies) == sum(1 for r in want.values() if r % B)  # one copy per partial tail
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        sched.schedule = schedule
    assert copies_seen


def test_eviction_of_one_routed_block_shrinks_the_hit(llm, reference):
    fresh(llm)
    producer = rand_tokens(230, seed=8)
    run(llm, [producer], max_tokens=2)
    sched = scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    index = sched.mod_index
    managers = routed_managers(llm)
    layer = 2
    m = managers[layer]
    consumer = producer[:220] + rand_tokens(5, seed=9)
    # the consumer's block hashes: from a request added and aborted before any step
    engine = llm.llm_engine
    engine.add_request("probe", {"prompt_token_ids": consumer}, params())
    request = next(r for r in sched.requests.values() if r.request_id.startswith("probe"))
    request_hashes = list(request.block_hashes)
    engine.abort_request(["probe"])
    engine.step() if engine.has_unfinished_requests() else None
    full = index.lookup(request_hashes, 219, m.kv_cache_group_id, B)
    assert full.num_tokens == 192
    counts = {n: reference.counts_at(producer, n)[layer] for n in range(B, 193, B)}
    victim = 1 if full.routed > 2 * B else 0  # evict the layer's block 1 (or 0)
    block = full.blocks[victim]
    # a real eviction: vLLM's pool hands the block out again (and drops its keys)
    pool.free_block_queue.remove(block)
    pool.free_block_queue.prepend_n([block])
    (taken,) = pool.get_new_blocks(1)
    assert taken is block and block.block_hash is None
    pool.free_blocks([taken])
    # the hit ends at the last boundary where that block was not yet needed
    want = max([n for n, r in counts.items() if r <= victim * B], default=0)
    out = run(llm, [consumer])[0]
    assert out.num_cached_tokens == want < 192
    check_against_reference(reference, [consumer], [out], 8)


def test_reset_prefix_cache_restores_the_free_count(llm):
    fresh(llm)
    sched = scheduler(llm)
    total = sched.kv_cache_manager.block_pool.num_gpu_blocks - 1
    prompt = rand_tokens(120, seed=13)
    run(llm, [prompt])
    assert free_blocks(llm) == total and sched.mod_index.entries  # cached blocks are free, evictable
    assert sched.reset_prefix_cache()
    assert free_blocks(llm) == total and not sched.mod_index.entries and not sched.mod_index.zeros
    assert run(llm, [prompt])[0].num_cached_tokens == 0


def test_requests_at_another_threshold_share_no_blocks(model_dir, llm):
    fresh(llm)
    prompt = rand_tokens(150, seed=14)
    hit = expected_hit(len(prompt))
    assert run(llm, [prompt])[0].num_cached_tokens == 0
    at_07 = run(llm, [prompt], p=0.7)[0]
    assert at_07.num_cached_tokens == 0 and at_07.kv_transfer_params["mod"]["threshold"] == 0.7
    assert run(llm, [prompt], p=0.7)[0].num_cached_tokens == hit  # p = 0.7 shares with itself
    assert run(llm, [prompt])[0].num_cached_tokens == hit  # default traffic keeps sharing
    assert run(llm, [prompt], p=0.5)[0].num_cached_tokens == hit  # the default p, given explicitly
    assert run(llm, [prompt], p=0.7049)[0].num_cached_tokens == hit  # rounded to 0.70
    ref = Reference(at_threshold(model_dir, 0.7))
    check_against_reference(ref, [prompt], [at_07], 8)


def test_invalid_threshold_is_a_value_error_for_that_request_only(llm):
    for bad in (1.5, -0.1, "0.6", True):
        with pytest.raises(ValueError, match="mod_threshold"):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], params(p=bad), use_tqdm=False)
    assert len(run(llm, [[1, 2, 3]])[0].outputs[0].token_ids) == 8  # the engine still serves


# Last: these start engines of their own (an engine shutting down tears down vLLM's process-wide
# parallel state, which the module's engine then lacks).
def test_caching_off_gives_the_same_tokens_and_counts(model_dir, llm, reference):
    fresh(llm)
    system = rand_tokens(150, seed=3)
    prompts = [system + rand_tokens(n, seed=40 + n) for n in (1, 9, 33)] + [system[:130]]
    on = run(llm, prompts[:1]) + run(llm, prompts[1:])
    assert all(o.num_cached_tokens > 0 for o in on[1:])
    with inproc_llm(str(model_dir), skip_tokenizer_init=True, max_model_len=512, enable_prefix_caching=False) as off_llm:
        assert scheduler(off_llm).mod_index is None
        off = run(off_llm, prompts[:1]) + run(off_llm, prompts[1:])
    assert [list(o.outputs[0].token_ids) for o in on] == [list(o.outputs[0].token_ids) for o in off]
    assert [routed_counts(o) for o in on] == [routed_counts(o) for o in off]
    check_against_reference(reference, prompts, on, 8)


@pytest.mark.parametrize("mode", ["eager", "compiled"])  # compiled: the graph's route op logs boundaries
def test_preemption_and_chunked_prefill_with_caching_on(mode, model_dir, reference):
    system = rand_tokens(96, seed=12)
    prompts = [system + rand_tokens(20 + 9 * i, seed=60 + i) for i in range(16)]
    # 160 KV blocks shared by 5 groups (a 512-token request needs 80): too few for 16 requests
    # of ~250 tokens; prefill chunks of at most 64 tokens
    with inproc_llm(str(model_dir), skip_tokenizer_init=True, max_model_len=512, kv_cache_memory_bytes=5 << 20,
                    max_num_batched_tokens=64, enable_chunked_prefill=True,
                    **(COMPILED if mode == "compiled" else {})) as llm:
        pool = free_blocks(llm)
        outs = run(llm, prompts, max_tokens=64)
        preemptions = metric(llm, "vllm:num_preemptions")
        hits = metric(llm, "vllm:prefix_cache_hits")
        assert free_blocks(llm) == pool
    print(f"preemptions {preemptions}, prefix-cache hit tokens {hits}")
    assert preemptions > 0 and hits > 0
    check_against_reference(reference, prompts, outs, 64)



def test_tensor_parallel_2_hits_and_resumes_on_both_ranks(model_dir, reference, monkeypatch):
    """vLLM's multiprocess executor: the hit's restored counts reach both ranks (the scheduler
    output is broadcast), the engine core runs in its own process."""
    import gc

    from vllm import LLM

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    system = rand_tokens(120, seed=15)
    prompts = [system + rand_tokens(n, seed=70 + n) for n in (3, 30)]
    llm = LLM(model=str(model_dir), tensor_parallel_size=2, distributed_executor_backend="mp", dtype="float32",
              skip_tokenizer_init=True, max_model_len=512, block_size=B, kv_cache_memory_bytes=64 << 20, seed=0,
              enforce_eager=True)
    try:
        first = run(llm, prompts[:1])
        second = run(llm, prompts[1:] + prompts[:1])
        stats = llm.collective_rpc("mod_kv_stats")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    assert first[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in second] == [96, expected_hit(len(prompts[0]))]
    check_against_reference(reference, prompts[:1] + prompts[1:] + prompts[:1], first + second, 8)
    assert stats[0]["routed_tokens"] == stats[1]["routed_tokens"]  # both ranks routed alike


def test_figures_reach_requests_stopped_by_a_stop_string(default_model_dir):
    """A stop string ends the request in the front end (detokenizer), after an engine output
    that was not final: the figures must be on it too."""
    prompt = "The capital of France is Paris. Tell me about it:"
    with inproc_llm(str(default_model_dir), max_model_len=512) as llm:
        stopped = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, stop=[" the", "."]),
                               use_tqdm=False)[0]
        plain = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0), use_tqdm=False)[0]
    assert stopped.outputs[0].finish_reason == "stop" and isinstance(stopped.outputs[0].stop_reason, str)
    for out in (stopped, plain):
        mod = out.kv_transfer_params["mod"]
        assert set(mod) == {"threshold", "routed_fraction", "kv_bytes", "dense_kv_bytes"}
        assert 0 < mod["kv_bytes"] <= mod["dense_kv_bytes"]
        assert all(0 <= f <= 1 for f in mod["routed_fraction"].values())

# ---- the index alone (no engine) --------------------------------------------------------------
def test_index_never_uses_a_block_handed_out_again():
    """Entries on vLLM's real block pool: a chain is valid only while none of its blocks has been
    allocated again (then the hit shrinks to before that block was needed)."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    from mod_serve.vllm_internals.prefix_cache import RoutedPrefixIndex

    pool = BlockPool(num_gpu_blocks=8, enable_caching=True, hash_block_size=4)
    index = RoutedPrefixIndex(pool)
    gid, bs = 3, 4
    hashes = [bytes([j]) * 32 for j in range(6)]
    blocks = pool.get_new_blocks(2)
    routed = {1: 0, 2: 3, 3: 4, 4: 6, 5: 9}  # r(jB) for boundaries j = 1..5 (grows by <= B)
    prev = last = None
    for j, r in routed.items():
        key = make_block_hash_with_group_id(hashes[j - 1], gid)
        if r == 0:
            index.register_zero(key)
            continue
        k = -(-r // bs) - 1
        if k >= len(blocks):
            blocks += pool.get_new_blocks(1)
        if last is not None and last.k == k - 1:
            prev = last
        elif last is not None:
            prev = last.prev
        last = index.entry_for(blocks[k], k, r, prev)
        index.register(key, last, blocks[k], j * bs)
    assert index.lookup(hashes, 23, gid, bs).num_tokens == 20
    assert index.lookup(hashes, 23, gid, bs).routed == 9
    assert [b.block_id for b in index.lookup(hashes, 23, gid, bs).blocks] == [b.block_id for b in blocks]
    assert index.lookup(hashes, 7, gid, bs).blocks == [] and index.lookup(hashes, 7, gid, bs).num_tokens == 4
    pool.free_blocks(reversed(blocks))
    # hand block 1 out again (vLLM's eviction path): boundaries 4 and 5 need it
    pool.free_block_queue.remove(blocks[1])
    pool.free_block_queue.prepend_n([blocks[1]])
    assert pool.get_new_blocks(1)[0] is blocks[1]
    hit = index.lookup(hashes, 23, gid, bs)
    assert (hit.num_tokens, hit.routed, [b.block_id for b in hit.blocks]) == (12, 4, [blocks[0].block_id])
    index.prune()  # drops entries whose own block was handed out (block 2's stays: found invalid by its chain)
    assert index.num_entries == 3


def test_threshold_goes_into_the_first_block_hash_only_when_not_the_default():
    from types import SimpleNamespace

    from vllm.v1.core import kv_cache_utils

    from mod_serve.vllm_internals import prefix_cache

    prefix_cache.install_block_hash_key()
    gen = kv_cache_utils.generate_block_hash_extra_keys
    old, prefix_cache.DEFAULT_THRESHOLD = prefix_cache.DEFAULT_THRESHOLD, 0.5
    try:
        def request(extra):
            return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), mm_features=[],
                                   lora_request=None, cache_salt=None, prompt_embeds=None)

        assert gen(request({"mod_threshold": 0.7}), 0, 32, 0)[0] == (("mod_p", 0.7),)
        assert gen(request({"mod_threshold": 0.7}), 32, 64, 0)[0] is None  # first block only: chained
        assert gen(request({"mod_threshold": 0.7049}), 0, 32, 0)[0] == (("mod_p", 0.7),)
        assert gen(request({"mod_threshold": 0.5}), 0, 32, 0)[0] is None  # the default p
        assert gen(request(None), 0, 32, 0)[0] is None
        prefix_cache.DEFAULT_THRESHOLD = None  # dense model / front end
        assert gen(request({"mod_threshold": 0.7}), 0, 32, 0)[0] is None
    finally:
        prefix_cache.DEFAULT_THRESHOLD = old
