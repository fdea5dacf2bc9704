"""Shared fixtures: tiny random LLaMA checkpoints and the real default model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mod_serve  # noqa: F401  (registers mod_llama with transformers)
from mod_serve.config import MoDLlamaConfig
from mod_serve.modeling import MoDLlamaForCausalLM

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    return model


def tiny_mod(routed_layers=(1, 3, 5), threshold=0.5, seed=0, half_skip=True, **overrides) -> MoDLlamaForCausalLM:
    """A tiny MoD model; with ``half_skip`` routers are random so that about half the tokens skip."""
    torch.manual_seed(seed)
    cfg = MoDLlamaConfig(**{**TINY, **overrides}, mod={"routed_layers": list(routed_layers), "threshold": threshold})
    model = MoDLlamaForCausalLM(cfg).eval()
    if half_skip:
        randomize_routers(model, seed)
    return model


def randomize_routers(model, seed=0, fraction=0.5):
    """Random router weights, biases calibrated so that about ``fraction`` of tokens route in."""
    from mod_serve.calibrate import calibrate_routers

    sample = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed + 7))
    return calibrate_routers(model, sample, fraction, weight_std=8.0 / model.config.hidden_size**0.5, seed=seed)


@pytest.fixture(scope="session")
def default_model_dir():
    from mod_serve.default_model import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def default_base_dir(default_model_dir):
    from mod_serve.default_model import prepare_base

    return prepare_base()


EMPTY_LAYER = 29


@pytest.fixture(scope="session")
def half_skip_model_dir(default_base_dir, tmp_path_factory):
    """The default base made MoD (every other layer routed) in float32, with routers calibrated so
    that about half of the tokens skip every routed layer (a stand-in for a trained MoD model with
    known sparsity), except the last layer, which no token enters (every batch gives that routed
    layer zero tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mod_serve.calibrate import calibrate_routers
    from mod_serve.convert import convert
    from tests.vllm_helpers import mixed_prompts

    out = tmp_path_factory.mktemp("half_skip")
    src = convert(default_base_dir, tmp_path_factory.mktemp("every_other") / "mod", routed_layers="every-other")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    texts = [tok.decode(p) for p in mixed_prompts(tok, 16)]
    enc = tok(texts, return_tensors="pt", padding=True)
    fractions = calibrate_routers(model, enc.input_ids, 0.5, attention_mask=enc.attention_mask, weight_std=0.05)
    assert all(0.4 < f < 0.6 for f in fractions.values()), fractions
    with torch.no_grad():
        model.model.layers[EMPTY_LAYER].router.bias.fill_(-1e4)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def dense_f32_dir(default_base_dir):
    return default_base_dir


@pytest.fixture(scope="session")
def all_in_model_dir(default_base_dir, tmp_path_factory):
    from mod_serve.convert import convert

    return convert(default_base_dir, tmp_path_factory.mktemp("all_in") / "mod", routed_layers="every-other")
