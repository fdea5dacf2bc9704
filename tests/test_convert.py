"""Conversion of LLaMA checkpoints into MoD checkpoints, and the transformers registration."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mod_serve.config import parse_routed_layers
from mod_serve.convert import ROUTER_SHARD, ConversionError, convert
from mod_serve.modeling import MoDLlamaForCausalLM, greedy_generate
from tests.conftest import TINY, tiny_llama


@pytest.fixture
def llama_dir(tmp_path):
    path = tmp_path / "llama"
    tiny_llama(seed=1).save_pretrained(path)
    return path


def test_converted_model_matches_original(llama_dir, tmp_path):
    dst = convert(llama_dir, tmp_path / "mod", threshold=0.5, routed_layers="all")
    mod = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(mod, MoDLlamaForCausalLM)
    dense = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref = mod(ids), dense(ids).logits
    assert all(m.all() for m in out.routed_masks.values())  # all routed in
    err = (out.logits - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), err
    prompt = ids[0, :10].tolist()
    want = dense.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    got, routed = greedy_generate(mod, prompt, 24)
    assert got == want[0, 10:].tolist()
    assert routed == {i: 10 + 24 - 1 for i in range(TINY["num_hidden_layers"])}


def test_config_and_router_tensors(llama_dir, tmp_path):
    dst = convert(llama_dir, tmp_path / "mod", threshold=0.3, routed_layers="every-other")
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["MoDLlamaForCausalLM"] and config["model_type"] == "mod_llama"
    assert config["mod"]["routed_layers"] == [1, 3, 5] and config["mod"]["threshold"] == 0.3
    original = json.loads((llama_dir / "config.json").read_text())
    for key, value in original.items():
        if key not in {"model_type", "architectures"}:
            assert config[key] == value, key
    routers = load_file(dst / ROUTER_SHARD)
    assert sorted(routers) == sorted(f"model.layers.{i}.router.{p}" for i in (1, 3, 5) for p in ("weight", "bias"))
    assert routers["model.layers.1.router.weight"].shape == (1, TINY["hidden_size"])
    assert routers["model.layers.1.router.bias"].shape == (1,)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.3.router.bias"] == ROUTER_SHARD

    # round trip: a MoD checkpoint converts again, the old routers replaced by new ones
    again = convert(dst, tmp_path / "mod2", threshold=0.6, routed_layers="0,2")
    routers = load_file(again / ROUTER_SHARD)
    assert sorted({k.split(".")[2] for k in routers}) == ["0", "2"]
    model = AutoModelForCausalLM.from_pretrained(again)
    assert model.routing.routed_layers == (0, 2) and model.routing.threshold == 0.6
    assert not any(".router." in k and k.split(".")[2] not in {"0", "2"} for k in model.state_dict())


def test_routed_layer_specs():
    assert parse_routed_layers("all", 4) == [0, 1, 2, 3]
    assert parse_routed_layers("every-other", 6) == [1, 3, 5]
    assert parse_routed_layers("2-4,0", 6) == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="out of range"):
        parse_routed_layers("7", 6)
    with pytest.raises(ValueError, match="--routed-layers"):
        parse_routed_layers("odd", 6)


def test_bad_sources_are_rejected_and_dst_never_half_written(llama_dir, tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path, tmp_path / "a")
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ConversionError, match="model_type 'gpt2'"):
        convert(gpt, tmp_path / "b")
    # truncated weights: an error naming the file, and no destination or temp dir left behind
    (llama_dir / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ConversionError, match="cannot read weight file"):
        convert(llama_dir, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.tmp")]
    with pytest.raises(ConversionError, match="routed_layers"):
        convert(llama_dir, tmp_path / "d", routed_layers=[9])


def test_missing_tensors_rejected(tmp_path):
    model = tiny_llama()
    state = {k: v for k, v in model.state_dict().items() if "layers.2.mlp" not in k}
    src = tmp_path / "src"
    model.save_pretrained(src, state_dict=state)
    with pytest.raises(ConversionError, match="lack 3 LLaMA tensors"):
        convert(src, tmp_path / "dst")


def test_cli_errors_name_the_bad_field(llama_dir, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "mod_serve.cli", *a], capture_output=True, text=True)
    bad = run("convert", str(llama_dir), str(tmp_path / "x"), "--routed-layers", "odd")
    assert bad.returncode == 2 and "--routed-layers" in bad.stderr
    bad = run("convert", str(llama_dir), str(tmp_path / "x"), "--threshold", "-1")
    assert bad.returncode == 2 and "threshold" in bad.stderr
    ok = run("convert", str(llama_dir), str(tmp_path / "x"))
    assert ok.returncode == 0, ok.stderr
    again = run("convert", str(llama_dir), str(tmp_path / "x"))
    assert again.returncode == 2 and "exists" in again.stderr


def test_plain_transformers_refuses_a_mod_checkpoint(llama_dir, tmp_path):
    dst = convert(llama_dir, tmp_path / "mod")
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(dst)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "mod_llama" in proc.stderr
