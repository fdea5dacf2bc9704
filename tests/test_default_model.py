"""The real default model: SmolLM2-135M-Instruct converted to MoD."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from mod_serve.modeling import MoDLlamaForCausalLM, greedy_generate

pytestmark = pytest.mark.slow


def test_default_checkpoint_layout(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["MoDLlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["num_key_value_heads"] == 3 and config["vocab_size"] == 49152
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


@torch.no_grad()
def test_all_routed_in_conversion_matches_dense_original(default_base_dir, tmp_path):
    from mod_serve.convert import convert

    all_in = convert(default_base_dir, tmp_path / "mod", routed_layers="every-other")
    tok = AutoTokenizer.from_pretrained(all_in)
    mod = AutoModelForCausalLM.from_pretrained(all_in, dtype=torch.float32).eval()
    dense = LlamaForCausalLM.from_pretrained(default_base_dir, dtype=torch.float32).eval()
    assert isinstance(mod, MoDLlamaForCausalLM)
    msgs = [{"role": "user", "content": "Name three primary colours."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    x = torch.tensor([ids])
    out, ref = mod(x), dense(x).logits
    assert all(m.all() for m in out.routed_masks.values())
    rel = ((out.logits - ref).abs().max() / ref.abs().max()).item()
    print(f"max |logit diff| / max |logit| = {rel:.2e}")
    assert rel < 1e-3, rel
    want = dense.generate(x, max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    got, _ = greedy_generate(mod, ids, 20, tok.eos_token_id)
    assert got == want[: len(got)] and len(got) == len(want)
