"""Reference MoD LLaMA in plain PyTorch: the executable specification of MoDification.

Semantics (the vLLM plugin and the trainer implement exactly these):

* routed layer i has a router ``Linear(hidden, 1)``; ``g = sigmoid(router(h))`` in float32;
* threshold-p: a token is routed into layer i iff ``g >= p`` (causal, token by token);
* the first ``sink_tokens`` positions of a sequence get ``g = 1`` (always in: the attention sink);
* a routed-in token gets ``h + g * (layer(h) - h)``, a skipped token keeps ``h``;
* at layer i attention runs over routed-in tokens only (the only queries and keys), causally,
  with RoPE at each token's true absolute position.

Two equivalent execution paths share one decoder-layer function:

* ``forward(input_ids)``: batched, every token computed, skipped tokens masked out of the
  keys (what training uses);
* ``forward(input_ids, attention_mask, cache=RoutedKVCache(...))``: only routed-in tokens
  computed; layer i's cache holds K/V of the tokens routed into layer i and nothing else. This is
  the path ``greedy_generate`` and transformers' ``generate()``/``pipeline`` (any batch size, left
  padding) decode with.

Padding (``attention_mask`` 0) is never routed in, attended to or cached, and positions are true
positions: a token's position counts the real tokens before it in its sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.utils import ModelOutput

from .config import MoDLlamaConfig, RoutingConfig
from .routed_cache import RoutedKVCache

ROUTER_INIT_BIAS = 12.0
"""Converted routers start at weight 0, bias 12: g = sigmoid(12) = 1 - 6.1e-6 for every token,
so every token is routed in and each layer's update is scaled by g, i.e. almost unchanged."""


@dataclass
class MoDOutput(ModelOutput):
    logits: torch.Tensor | None = None
    router_probs: dict[int, torch.Tensor] | None = None  # layer -> [B, T] float32
    routed_masks: dict[int, torch.Tensor] | None = None  # layer -> [B, T] bool
    loss: torch.Tensor | None = None
    past_key_values: RoutedKVCache | None = None  # the cache passed in, updated

    def routed_fraction(self, valid: torch.Tensor | None = None) -> dict[int, float]:
        """Fraction of (valid) tokens routed into each routed layer."""
        out = {}
        for layer, mask in self.routed_masks.items():
            if valid is None:
                out[layer] = mask.float().mean().item()
            else:
                out[layer] = (mask & valid.bool()).sum().item() / max(int(valid.sum()), 1)
        return out


def router_probs(router: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """g = sigmoid(w . h + b), computed in float32: [..., hidden] -> [...]."""
    return torch.sigmoid(F.linear(hidden.float(), router.weight.float(), router.bias.float())).squeeze(-1)


def force_sink(g: torch.Tensor, positions: torch.Tensor, sink_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, forced): the first ``sink_tokens`` absolute positions get g = 1 (full update) and are
    routed in whatever the threshold."""
    forced = positions < sink_tokens
    return torch.where(forced, torch.ones_like(g), g), forced


def route(g: torch.Tensor, routing: RoutingConfig, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Routing decision per token: [B, T] probabilities -> [B, T] bool."""
    if valid is None:
        valid = torch.ones_like(g, dtype=torch.bool)
    if routing.router == "threshold":
        return (g >= routing.threshold) & valid
    # Original MoD top-k: the ceil(capacity * n) highest scores of each sequence (non-causal).
    mask = torch.zeros_like(valid)
    for b in range(g.shape[0]):
        n = int(valid[b].sum())
        k = min(n, math.ceil(routing.capacity * n))
        if k:
            top = torch.topk(g[b].masked_fill(~valid[b], -1.0), k).indices
            mask[b, top] = True
    return mask


def routed_attention_mask(routed: torch.Tensor, past: int = 0) -> torch.Tensor:
    """[B, T] keys allowed per query: causal, routed keys only, plus the diagonal.

    The diagonal keeps rows of skipped queries finite; their outputs are discarded, and for a
    routed query the diagonal is a routed key anyway. Returns [B, 1, T, T] bool.
    """
    T = routed.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=routed.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=routed.device)
    return ((causal & routed[:, None, :]) | eye)[:, None]


def true_positions(valid: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """[B, T] position of each token: ``start`` plus the real tokens before it in its sequence
    (padding: clamped to 0, never used)."""
    return (start + valid.long().cumsum(1) - 1).clamp(min=0)


def decoder_layer_forward(layer, hidden, cos, sin, attn_mask=None, cache=None, layer_idx=None, rows=None):
    """One LLaMA decoder layer on [B, T, H] with an explicit boolean attention mask.

    With ``cache`` (a ``RoutedKVCache``), K/V of the real ``rows`` ([B, T] bool, default all) go to
    the next free slots of each sequence in the layer's compact cache, and each row attends
    causally to its sequence's slots up to its own.
    """
    attn = layer.self_attn
    B, T, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        rows = torch.ones(B, T, dtype=torch.bool, device=hidden.device) if rows is None else rows
        k, v = cache.update(k, v, layer_idx, rows)
        attn_mask = cache.layers[layer_idx].causal_mask(rows)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=attn.scaling, enable_gqa=True)
    h = hidden + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def compact_layer_forward(layer, hidden, m, g, cos, sin, cache, layer_idx):
    """The cache path of one layer: only the tokens with ``m`` set run it, each sequence's in order
    (gathered into [B, R] rows, R = the largest count, padding rows marked by ``rows``); the update
    is gated by ``g`` (None: an unrouted layer, no gate) and every other token keeps ``hidden``."""
    if m.all():  # every token (an unrouted layer without padding, or all routed in): no gather
        out = decoder_layer_forward(layer, hidden, cos, sin, cache=cache, layer_idx=layer_idx)
        return out if g is None else gated_update(hidden, out, g)
    count = m.sum(1)
    R = int(count.max())
    if R == 0:
        return hidden
    idx = torch.argsort((~m).byte(), dim=1, stable=True)[:, :R]  # each sequence's m-tokens first, in order
    rows = torch.arange(R, device=m.device) < count[:, None]

    def pick(t):
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    h_in = pick(hidden)
    out = decoder_layer_forward(layer, h_in, pick(cos), pick(sin), cache=cache, layer_idx=layer_idx, rows=rows)
    if g is not None:
        out = gated_update(h_in, out, g.gather(1, idx))
    out = torch.where(rows[..., None], out, h_in)  # padding rows write back what they read
    return hidden.scatter(1, idx[..., None].expand_as(out), out)


def gated_update(hidden: torch.Tensor, layer_out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """h + g * (layer(h) - h), in the hidden dtype (the same expression the vLLM model uses)."""
    return hidden + g.to(hidden.dtype).unsqueeze(-1) * (layer_out - hidden)


class MoDLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM plus a router on each routed layer (``model.layers.{i}.router``)."""

    config_class = MoDLlamaConfig

    def __init__(self, config: MoDLlamaConfig):
        super().__init__(config)
        for i in config.routing.routed_layers:
            router = nn.Linear(config.hidden_size, 1, bias=True)
            nn.init.zeros_(router.weight)
            nn.init.constant_(router.bias, ROUTER_INIT_BIAS)
            self.model.layers[i].router = router

    @property
    def routing(self) -> RoutingConfig:
        return self.config.routing

    def set_threshold(self, threshold: float) -> None:
        self.config.mod = RoutingConfig.from_dict(
            {**self.config.mod, "threshold": threshold}, self.config.num_hidden_layers
        ).to_dict()

    def routers(self) -> dict[int, nn.Linear]:
        return {i: self.model.layers[i].router for i in self.routing.routed_layers}

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """``generate()`` decodes with the compact ``RoutedKVCache`` (GenerationMixin's hook where
        it would make a DynamicCache, which would hold every token in every layer)."""
        past = model_kwargs.get("past_key_values")
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r}: a MoD model decodes "
                "with its own compact cache (mod_serve.RoutedKVCache) only"
            )
        if past is not None and not isinstance(past, RoutedKVCache):
            raise TypeError(f"past_key_values must be a mod_serve.RoutedKVCache, got {type(past).__name__}")
        if past is None and generation_config.use_cache:
            model_kwargs["past_key_values"] = RoutedKVCache(self.config.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: RoutedKVCache | None = None,
        labels: torch.LongTensor | None = None,
        routing: RoutingConfig | None = None,
        router_hook=None,
        past_key_values: RoutedKVCache | None = None,
        **_: object,
    ) -> MoDOutput:
        """``attention_mask``: [B, T] (with a cache it may also be generate's [B, past + T]); 0 marks
        padding. ``cache`` (or ``past_key_values``, transformers' name): decode incrementally with the
        compact cache, threshold routing only. ``router_hook(layer, hidden, valid)``, if given, runs
        before each routed layer's router and may change it (used to calibrate all routers in one pass)."""
        routing = routing or self.routing
        cache = cache if cache is not None else past_key_values
        model = self.model
        h = model.embed_tokens(input_ids)
        B, T = input_ids.shape
        valid = torch.ones(B, T, dtype=torch.bool, device=h.device)
        if attention_mask is not None:
            valid = attention_mask[:, -T:].bool()
        start = 0
        if cache is not None:
            if routing.router != "threshold":
                raise ValueError("top-k routing is not causal and cannot decode incrementally")
            start = cache.start_positions(B, h.device)[:, None]
        positions = true_positions(valid, start)
        cos, sin = model.rotary_emb(h, positions)
        full_mask = routed_attention_mask(valid) if cache is None else None
        probs, masks = {}, {}
        routed_set = set(routing.routed_layers)
        for i, layer in enumerate(model.layers):
            if i not in routed_set:
                if cache is None:
                    h = decoder_layer_forward(layer, h, cos, sin, full_mask)
                else:
                    h = compact_layer_forward(layer, h, valid, None, cos, sin, cache, i)
                continue
            if router_hook is not None:
                router_hook(i, h, valid)
            g, forced = force_sink(router_probs(layer.router, h), positions, routing.sink_tokens)
            m = route(g, routing, valid) | (forced & valid)
            probs[i], masks[i] = g, m
            if cache is None:
                layer_out = decoder_layer_forward(layer, h, cos, sin, routed_attention_mask(m & valid))
                h = torch.where(m.unsqueeze(-1), gated_update(h, layer_out, g), h)
            else:
                h = compact_layer_forward(layer, h, m, g, cos, sin, cache, i)
        if cache is not None:
            cache.advance(valid)
        logits = self.lm_head(model.norm(h)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return MoDOutput(logits=logits, router_probs=probs, routed_masks=masks, loss=loss, past_key_values=cache)


@torch.no_grad()
def greedy_generate(
    model: MoDLlamaForCausalLM, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None
) -> tuple[list[int], dict[int, int]]:
    """Greedy decoding with the compact routed cache.

    Returns the generated token ids and, per routed layer, how many tokens (prompt and generated,
    excluding the last sampled token, which is never fed back) were routed into it.
    """
    cache = RoutedKVCache(model.config.num_hidden_layers)
    routed = {i: 0 for i in model.routing.routed_layers}
    ids = torch.tensor([prompt_ids], device=model.device)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        out = model(ids, cache=cache)
        for i, m in out.routed_masks.items():
            routed[i] += int(m.sum())
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if token == eos_token_id:
            break
        ids = torch.tensor([[token]], device=model.device)
    return generated, routed
