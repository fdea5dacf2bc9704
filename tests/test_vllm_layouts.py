"""Every routed-layer set a checkpoint can have, served by the real vLLM engine (CPU, float32).

A small random LLaMA (6 layers, 4 query / 2 KV heads of 64) made MoD with routers calibrated so
that about half of the tokens skip each routed layer. For each set: one KV cache group per routed
layer (and vLLM's grouping checked at start-up), greedy tokens and per-layer routed counts equal
to the reference model's, and every block back in the pool afterwards.
"""

from __future__ import annotations

import pytest
import torch

from mod_serve.convert import parse_routed_layers
from tests.conftest import tiny_mod
from tests.vllm_helpers import COMPILED, free_blocks, greedy, inproc_llm, reference_generate, scheduler, token_ids, worker

pytestmark = pytest.mark.slow

SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=1024, num_hidden_layers=6)
MAX_TOKENS = 8
COMPILED_LAYOUTS = ("all", "every-other")  # also through vLLM's compiled graph (the others eager)
LAYOUTS = {"all": "all", "none": "none", "first": "0", "last": "5", "range": "2-4", "every-other": "every-other",
           "list": "0,2,5"}


def small_mod_dir(tmp_path, routed_layers, seed=0):
    model = tiny_mod(routed_layers=routed_layers, seed=seed, **SMALL)
    model.save_pretrained(tmp_path)
    return tmp_path


def random_prompts(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 120, (n,), generator=g).tolist()
    return [torch.randint(0, SMALL["vocab_size"], (L,), generator=g).tolist() for L in lengths]


def run_engine(model_dir, prompts, **kwargs):
    with inproc_llm(str(model_dir), skip_tokenizer_init=True, max_model_len=512, **kwargs) as llm:
        pool = free_blocks(llm)
        got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(MAX_TOKENS)))
        stats = llm.collective_rpc("mod_kv_stats")[0]
        groups = scheduler(llm).kv_cache_config.kv_cache_groups
        assert free_blocks(llm) == pool
        bound = dict(worker(llm).model_runner.model.routing_state.group_of_layer)
    return got, stats, groups, bound


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_routed_layer_set_serves_like_the_reference(layout, tmp_path):
    routed = parse_routed_layers(LAYOUTS[layout], SMALL["num_hidden_layers"])
    model_dir = small_mod_dir(tmp_path, routed)
    prompts = random_prompts()
    want, want_routed = reference_generate(model_dir, prompts, MAX_TOKENS)
    got, stats, groups, bound = run_engine(model_dir, prompts, **(COMPILED if layout in COMPILED_LAYOUTS else {}))
    assert got == want
    assert {int(k): v for k, v in stats["routed_tokens"].items()} == want_routed
    # one KV cache group of exactly one layer per routed layer
    assert sorted(bound) == sorted(routed)
    for layer, gid in bound.items():
        assert groups[gid].layer_names == [f"model.layers.{layer}.self_attn.attn"]
        assert groups[gid].kv_cache_spec.layer_index == layer
    total = sum(len(p) + MAX_TOKENS - 1 for p in prompts)
    assert stats["tokens_seen"] == total
    if routed:  # the calibrated routers do skip tokens, but not all of them
        assert all(0 < n < total for n in want_routed.values()), want_routed


def test_startup_refuses_routed_layers_sharing_a_group():
    """If vLLM ever groups routed layers together (as 0.32 did before the spec's uniformity
    hook), the engine must refuse at start-up, not corrupt KV at the first request."""
    from types import SimpleNamespace

    from mod_serve.vllm_internals import RoutedAttentionSpec, routed_groups
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    spec = dict(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)
    a, b = RoutedAttentionSpec(**spec, layer_index=0), RoutedAttentionSpec(**spec, layer_index=1)
    assert not a.is_uniform_with_collection({"x": a, "y": b})
    merged = UniformTypeKVCacheSpecs(block_size=32, kv_cache_specs={"l0": a, "l1": b})
    bad = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=merged, layer_names=["l0", "l1"])])
    with pytest.raises(RuntimeError, match="one KV cache group"):
        routed_groups(bad)
    good = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=b, layer_names=["l1"]),
                                            SimpleNamespace(kv_cache_spec=a, layer_names=["l0"])])
    assert routed_groups(good) == {1: 0, 0: 1}
