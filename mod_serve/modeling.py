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
* ``forward(input_ids, cache=RoutedKVCache(...))``: batch 1, only routed-in tokens computed;
  layer i's cache holds K/V of the tokens routed into layer i and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .config import MoDLlamaConfig, RoutingConfig

ROUTER_INIT_BIAS = 12.0
"""Converted routers start at weight 0, bias 12: g = sigmoid(12) = 1 - 6.1e-6 for every token,
so every token is routed in and each layer's update is scaled by g, i.e. almost unchanged."""


@dataclass
class MoDOutput:
    logits: torch.Tensor
    router_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, T] float32
    routed_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, T] bool
    loss: torch.Tensor | None = None

    def routed_fraction(self, valid: torch.Tensor | None = None) -> dict[int, float]:
        """Fraction of (valid) tokens routed into each routed layer."""
        out = {}
        for layer, mask in self.routed_masks.items():
            if valid is None:
                out[layer] = mask.float().mean().item()
            else:
                out[layer] = (mask & valid.bool()).sum().item() / max(int(valid.sum()), 1)
        return out


class RoutedKVCache:
    """Compact per-layer KV cache for batch-1 incremental decoding.

    ``keys[i]`` is ``[num_kv_heads, n_i, head_dim]`` where ``n_i`` is the number of tokens routed
    into layer i so far (every token for an unrouted layer); RoPE is already applied, so the
    compact order needs no position bookkeeping.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.num_tokens = 0  # absolute tokens seen (the next token's position)

    def layer_len(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[-2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


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


def decoder_layer_forward(layer, hidden, cos, sin, attn_mask=None, cache=None, layer_idx=None):
    """One LLaMA decoder layer on [B, T, H] with an explicit boolean attention mask.

    With ``cache`` (batch 1), K/V are appended to the layer's compact cache and the T queries
    attend causally (bottom-right aligned) to everything cached for this layer.
    """
    attn = layer.self_attn
    B, T, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        past = cache.layer_len(layer_idx)
        k, v = cache.append(layer_idx, k, v)
        attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=hidden.device).tril(past)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=attn.scaling, enable_gqa=True)
    h = hidden + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


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

    def generate(self, *args, **kwargs):
        raise NotImplementedError(
            "MoDLlamaForCausalLM has its own compact cache: use mod_serve.modeling.greedy_generate "
            "(or serve it with vLLM)"
        )

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: RoutedKVCache | None = None,
        labels: torch.LongTensor | None = None,
        routing: RoutingConfig | None = None,
        router_hook=None,
        **_: object,
    ) -> MoDOutput:
        """``router_hook(layer, hidden, valid)``, if given, runs before each routed layer's router
        and may change it (used to calibrate all routers in one pass)."""
        routing = routing or self.routing
        model = self.model
        h = model.embed_tokens(input_ids)
        B, T = input_ids.shape
        start = 0 if cache is None else cache.num_tokens
        positions = torch.arange(start, start + T, device=h.device).unsqueeze(0).expand(B, T)
        cos, sin = model.rotary_emb(h, positions)
        valid = torch.ones(B, T, dtype=torch.bool, device=h.device)
        if attention_mask is not None:
            valid = attention_mask.bool()
        if cache is not None:
            if B != 1 or attention_mask is not None:
                raise ValueError("the compact-cache path decodes one unpadded sequence (batch 1)")
            if routing.router != "threshold":
                raise ValueError("top-k routing is not causal and cannot decode incrementally")
        full_mask = routed_attention_mask(valid)
        out = MoDOutput(logits=None)  # type: ignore[arg-type]
        routed_set = set(routing.routed_layers)
        for i, layer in enumerate(model.layers):
            if i not in routed_set:
                if cache is None:
                    h = decoder_layer_forward(layer, h, cos, sin, full_mask)
                else:
                    h = decoder_layer_forward(layer, h, cos, sin, cache=cache, layer_idx=i)
                continue
            if router_hook is not None:
                router_hook(i, h, valid)
            g, forced = force_sink(router_probs(layer.router, h), positions, routing.sink_tokens)
            m = route(g, routing, valid) | (forced & valid)
            out.router_probs[i], out.routed_masks[i] = g, m
            if cache is None:
                layer_out = decoder_layer_forward(layer, h, cos, sin, routed_attention_mask(m & valid))
                h = torch.where(m.unsqueeze(-1), gated_update(h, layer_out, g), h)
            else:
                idx = m[0].nonzero().squeeze(-1)
                if idx.numel():
                    h_in = h[:, idx]
                    layer_out = decoder_layer_forward(
                        layer, h_in, cos[:, idx], sin[:, idx], cache=cache, layer_idx=i
                    )
                    h = h.clone()
                    h[:, idx] = gated_update(h_in, layer_out, g[:, idx])
        if cache is not None:
            cache.num_tokens += T
        out.logits = self.lm_head(model.norm(h)).float()
        if labels is not None:
            out.loss = F.cross_entropy(
                out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return out


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
    ids = torch.tensor([prompt_ids])
    generated: list[int] = []
    for _ in range(max_new_tokens):
        out = model(ids, cache=cache)
        for i, m in out.routed_masks.items():
            routed[i] += int(m.sum())
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if token == eos_token_id:
            break
        ids = torch.tensor([[token]])
    return generated, routed
