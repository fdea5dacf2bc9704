"""The reference model on a CUDA GPU (transformers' ``generate()`` through the compact routed
cache): float32 on the GPU decides and decodes as on the CPU; bf16 keeps the router in float32.

Skipped without a CUDA GPU (this project's CI box is CPU-only). Runs with plain PyTorch and
transformers, no vLLM: ``python -m pytest tests/test_modeling_cuda.py`` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from mod_serve.modeling import RoutedKVCache, greedy_generate
from tests.test_hf_generate import NEW, _left_padded, _prompts
from tests.test_hf_generate import _model as hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def _model():
    model = hf_model()
    model.config.mod = {**model.config.mod, "sink_tokens": 1}
    return model


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@torch.no_grad()
def test_float32_on_cuda_routes_and_decodes_as_on_cpu():
    model = _model()
    want = [greedy_generate(model, p, NEW) for p in _prompts()]  # CPU
    model.cuda()
    for prompt, (tokens, routed) in zip(_prompts(), want):
        assert greedy_generate(model, prompt, NEW) == (tokens, routed)
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NEW, do_sample=False,
                             return_dict_in_generate=True)
        assert out.sequences[0, len(prompt):].tolist() == tokens
        cache = out.past_key_values
        assert isinstance(cache, RoutedKVCache)
        fed = len(prompt) + NEW - 1
        for i in range(model.config.num_hidden_layers):
            assert cache.layer_len(i) == routed.get(i, fed), i  # compact: routed-in tokens only
    assert any(0 < n < len(p) + NEW - 1 for p, (_, r) in zip(_prompts(), want) for n in r.values())  # sparse


@torch.no_grad()
def test_left_padded_batch_on_cuda_equals_each_sequence_alone():
    model = _model().cuda()
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    width = ids.shape[1]
    cache = RoutedKVCache(model.config.num_hidden_layers)
    out = model.generate(ids.cuda(), attention_mask=mask.cuda(), past_key_values=cache, max_new_tokens=NEW,
                         do_sample=False)
    for b, prompt in enumerate(prompts):
        tokens, routed = greedy_generate(model, prompt, NEW)
        assert out[b, width:].tolist() == tokens, b
        for i in range(model.config.num_hidden_layers):
            assert int(cache.layers[i].lengths[b]) == routed.get(i, len(prompt) + NEW - 1), (b, i)


@torch.no_grad()
def test_bf16_on_cuda_keeps_the_router_in_float32():
    model = _model().to(device="cuda", dtype=torch.bfloat16)
    prompt = _prompts()[1]
    out = model(torch.tensor([prompt], device="cuda"))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # the layers run in bf16
    assert out.router_probs and all(g.dtype == torch.float32 for g in out.router_probs.values())
    tokens, routed = greedy_generate(model, prompt, NEW)
    gen = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NEW, do_sample=False,
                         return_dict_in_generate=True)
    assert gen.sequences[0, len(prompt):].tolist() == tokens  # generate() and the reference loop agree
    for i, n in routed.items():
        assert gen.past_key_values.layer_len(i) == n
