"""The reference MoD model against plain PyTorch / transformers computations."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mod_serve.modeling import (
    RoutedKVCache,
    decoder_layer_forward,
    greedy_generate,
    routed_attention_mask,
    router_probs,
)
from tests.conftest import TINY, tiny_mod


def _ids(n, seed=0, batch=1):
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_masks_follow_threshold_exactly():
    model = tiny_mod(routed_layers=(0, 2, 4), threshold=0.5)
    ids = _ids(40)
    out = model(ids)
    for i, g in out.router_probs.items():
        assert torch.equal(out.routed_masks[i], g >= 0.5)
    # layer 0's input is the embedding, so its scores can be computed by hand
    router = model.model.layers[0].router
    h = model.model.embed_tokens(ids).double()
    by_hand = torch.sigmoid(h @ router.weight.double().T + router.bias.double()).squeeze(-1)
    torch.testing.assert_close(out.router_probs[0].double(), by_hand, rtol=1e-5, atol=1e-6)
    frac = out.routed_fraction()
    assert all(0.1 < f < 0.9 for f in frac.values()), frac  # the routers really split tokens


@torch.no_grad()
def test_threshold_zero_routes_everything_and_above_one_routes_nothing():
    model = tiny_mod(routed_layers=(1, 3, 5))
    ids = _ids(30)
    model.set_threshold(0.0)
    assert all(m.all() for m in model(ids).routed_masks.values())
    model.set_threshold(1.01)
    out = model(ids)
    assert not any(m.any() for m in out.routed_masks.values())
    # With nothing routed in, the model is exactly the model made of the unrouted layers alone.
    keep = [0, 2, 4]
    dense = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": len(keep)})).eval()
    state = {k: v for k, v in model.state_dict().items() if ".router." not in k and "layers." not in k}
    for new, old in enumerate(keep):
        prefix = f"model.layers.{old}."
        state.update({k.replace(prefix, f"model.layers.{new}."): v for k, v in model.state_dict().items()
                      if k.startswith(prefix) and ".router." not in k})
    dense.load_state_dict(state)
    torch.testing.assert_close(out.logits, dense(ids).logits.float(), rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("prefill", [1, 9, 31])
def test_full_forward_equals_compact_incremental_decode(prefill):
    model = tiny_mod(routed_layers=(1, 2, 4, 5))
    ids = _ids(48, seed=prefill)
    full = model(ids)
    cache = RoutedKVCache(model.config.num_hidden_layers)
    steps = [model(ids[:, :prefill], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    logits = torch.cat([s.logits for s in steps], dim=1)
    torch.testing.assert_close(logits, full.logits, rtol=1e-4, atol=1e-4)
    for i, mask in full.routed_masks.items():
        inc = torch.cat([s.routed_masks[i] for s in steps], dim=1)
        assert torch.equal(inc, mask), f"layer {i} routing differs"
        # compact: the layer's cache holds exactly the routed-in tokens
        assert cache.layer_len(i) == int(mask.sum())
        assert 0.1 < mask.float().mean() < 0.9
    assert cache.layer_len(0) == ids.shape[1]  # unrouted layers keep every token


@torch.no_grad()
def test_routed_attention_equals_explicit_masked_computation():
    model = tiny_mod(routed_layers=(2,))
    layer, rot = model.model.layers[2], model.model.rotary_emb
    T = 24
    h = torch.randn(1, T, TINY["hidden_size"])
    routed = torch.rand(1, T, generator=torch.Generator().manual_seed(3)) < 0.5
    pos = torch.arange(T)[None]
    cos, sin = rot(h, pos)
    out = decoder_layer_forward(layer, h, cos, sin, routed_attention_mask(routed))

    # Explicit: per routed query, softmax over routed keys at or before it, in float64.
    attn = layer.self_attn
    d, nq, nkv = attn.head_dim, TINY["num_attention_heads"], TINY["num_key_value_heads"]
    x = layer.input_layernorm(h)[0].double()
    q = (x @ attn.q_proj.weight.double().T).view(T, nq, d)
    k = (x @ attn.k_proj.weight.double().T).view(T, nkv, d)
    v = (x @ attn.v_proj.weight.double().T).view(T, nkv, d)
    c, s = cos[0].double()[:, None], sin[0].double()[:, None]

    def rope(t):
        t1, t2 = t[..., : d // 2], t[..., d // 2 :]
        return t * c + torch.cat([-t2, t1], -1) * s

    q, k = rope(q), rope(k)
    for t in routed[0].nonzero().squeeze(-1).tolist():
        keys = [j for j in range(t + 1) if routed[0, j]]
        heads = []
        for head in range(nq):
            kv = head // (nq // nkv)
            scores = torch.stack([q[t, head] @ k[j, kv] for j in keys]) / math.sqrt(d)
            w = torch.softmax(scores, 0)
            heads.append(sum(wj * v[j, kv] for wj, j in zip(w, keys)))
        a = torch.cat(heads) @ attn.o_proj.weight.double().T
        hh = h[0, t].double() + a
        mlp = layer.mlp.float()
        expected = hh + mlp(layer.post_attention_layernorm(hh.float()[None]))[0].double()
        torch.testing.assert_close(out[0, t].double(), expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_single_sequences(side):
    """Padding on either side: each sequence keeps its true positions (left padding does not
    shift them) and sees no padding, so its logits and routing are those it has alone."""
    model = tiny_mod(routed_layers=(1, 3))
    model.config.mod = {**model.config.mod, "sink_tokens": 1}
    lengths = [17, 9, 25]
    seqs = [_ids(n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    spans = [slice(0, len(s)) if side == "right" else slice(width - len(s), width) for s in seqs]
    for b, (s, span) in enumerate(zip(seqs, spans)):
        ids[b, span], mask[b, span] = s, 1
    batched = model(ids, attention_mask=mask)
    for b, (s, span) in enumerate(zip(seqs, spans)):
        single = model(s[None])
        torch.testing.assert_close(batched.logits[b, span], single.logits[0], rtol=1e-4, atol=1e-4)
        for i in single.routed_masks:
            assert torch.equal(batched.routed_masks[i][b, span], single.routed_masks[i][0])
            assert int(batched.routed_masks[i][b].sum()) == int(single.routed_masks[i].sum())  # no padding


@torch.no_grad()
def test_topk_routes_capacity_fraction_and_refuses_incremental_decode():
    model = tiny_mod(routed_layers=(1, 3))
    model.config.mod = {**model.config.mod, "router": "topk", "capacity": 0.25}
    ids = _ids(40)
    out = model(ids)
    for i, m in out.routed_masks.items():
        assert int(m.sum()) == 10
        g = out.router_probs[i][0]
        assert g[m[0]].min() >= g[~m[0]].max()  # exactly the highest scores
    with pytest.raises(ValueError, match="top-k"):
        model(ids[:, :5], cache=RoutedKVCache(6))


@torch.no_grad()
def test_greedy_generate_counts_routed_tokens():
    model = tiny_mod(routed_layers=(1, 4))
    prompt = _ids(12)[0].tolist()
    tokens, routed = greedy_generate(model, prompt, max_new_tokens=10)
    full = model(torch.tensor([prompt + tokens[:-1]]))
    assert tokens == full.logits[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert routed == {i: int(m.sum()) for i, m in full.routed_masks.items()}


def test_router_probs_are_float32_for_bf16_hidden():
    router = torch.nn.Linear(8, 1).to(torch.bfloat16)
    g = router_probs(router, torch.randn(3, 8, dtype=torch.bfloat16))
    assert g.dtype == torch.float32 and g.shape == (3,)


@torch.no_grad()
@pytest.mark.parametrize("sink_tokens", [1, 3])
def test_sink_tokens_always_run_every_layer_in_full(sink_tokens):
    """Routers that send every token away still run the first ``sink_tokens`` positions through
    every layer with gate 1: those positions see only each other, so their logits are the dense
    model's; the compact cache then holds exactly them, also when decoding token by token."""
    model = tiny_mod(routed_layers=(0, 1, 2, 3, 4, 5), half_skip=False)
    model.config.mod = {**model.config.mod, "sink_tokens": sink_tokens}
    for router in model.routers().values():
        router.bias.fill_(-12.0)  # g ~ 6e-6: nothing would route in
    ids = _ids(20, seed=sink_tokens)
    out = model(ids)
    for i, mask in out.routed_masks.items():
        assert mask[0, :sink_tokens].all() and not mask[0, sink_tokens:].any(), i
        assert torch.all(out.router_probs[i][0, :sink_tokens] == 1.0)
    dense = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if ".router." not in k})
    ref = dense(ids[:, :sink_tokens]).logits.float()
    torch.testing.assert_close(out.logits[:, :sink_tokens], ref, rtol=1e-4, atol=1e-4)
    cache = RoutedKVCache(model.config.num_hidden_layers)
    steps = [model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat([s.logits for s in steps], dim=1), out.logits, rtol=1e-4, atol=1e-4)
    assert all(cache.layer_len(i) == sink_tokens for i in range(6))


def test_sink_tokens_config_is_validated():
    from mod_serve.config import RoutingConfig

    assert RoutingConfig.from_dict({"routed_layers": [1], "sink_tokens": 2}, 4).to_dict()["sink_tokens"] == 2
    assert RoutingConfig.from_dict({"routed_layers": [1]}, 4).sink_tokens == 0  # older checkpoints
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="mod.sink_tokens"):
            RoutingConfig.from_dict({"routed_layers": [1], "sink_tokens": bad}, 4)
