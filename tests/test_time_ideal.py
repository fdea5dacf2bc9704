"""What the CPU-time ideal is measured from (``mod_serve.time_ideal``, ``vllm_internals.profile``),
on a real dense engine: every layer's attention timed once per step, the prefill and decode steps
told apart, vLLM's classes restored afterwards. (The arithmetic is in test_bench.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mod_serve import bench, time_ideal
from tests.test_vllm_layouts import SMALL
from tests.vllm_helpers import inproc_llm

pytestmark = pytest.mark.slow


def test_dense_profile_times_each_layer_once_per_step(tmp_path):
    from vllm.model_executor.models import llama
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    torch.manual_seed(0)
    config = LlamaConfig(**SMALL)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    originals = (llama.LlamaForCausalLM.forward, CPUAttentionBackendImpl.forward)
    prompts = [list(range(5, 5 + n)) for n in (40, 70, 9)]
    decode_tokens = 6
    with inproc_llm(str(tmp_path), skip_tokenizer_init=True, max_model_len=256) as llm:
        phases = time_ideal.dense_profile(llm, prompts, decode_tokens, bench._params)
    assert (llama.LlamaForCausalLM.forward, CPUAttentionBackendImpl.forward) == originals
    pre, dec = phases["prefill"], phases["decode"]
    assert pre["steps"] == 1  # all three prompts fit one step's token budget
    assert dec["steps"] == decode_tokens - 1  # each later step decodes all three
    for phase in (pre, dec):
        assert phase["attention_calls"] == SMALL["num_hidden_layers"] * phase["steps"]
        assert 0 < phase["attention_s"] < phase["forward_s"] < phase["step_s"]


def test_linear_curve_has_one_entry_per_row_count():
    config = LlamaConfig(**SMALL)
    lin = time_ideal.linear_curve(config, "float32", 4)
    assert len(lin) == 5 and lin[0] == 0.0 and all(t > 0 for t in lin[1:])
    assert time_ideal.expected_share(lin, 4, 1.0) == pytest.approx(1.0)
