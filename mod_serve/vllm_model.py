"""MoD LLaMA for vLLM: vLLM's LLaMA plus a router per routed layer and routed-only attention.

A sibling of ``vllm/model_executor/models/llama.py`` that reuses its decoder layer, MLP, RMSNorm,
rotary embedding and parallel linear layers. Semantics are those of the reference
(``mod_serve.modeling``): ``g = sigmoid(router(h))`` in float32, a token runs routed layer i iff
``g >= p`` (the first ``sink_tokens`` positions always, with g = 1), then
``h <- h + g * (layer(h) - h)``; attention at layer i sees only the tokens routed into it, through
that layer's compact paged KV cache (see ``mod_serve.vllm_internals``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
)
from vllm.sequence import IntermediateTensors

from .config import RoutingConfig
from .modeling import force_sink, gated_update, router_probs
from .vllm_internals import RoutingState, make_attention_routed, routed_attention, shared_metadata_backend
from .vllm_internals.gemm import accept_empty_inputs
from .vllm_internals.routed_op import (
    add_rms_norm,
    attend,
    cpu_ops,
    register_routed_layer,
    rms_norm,
    rotary,
    rotary_graph,
    route,
    routed_layer,
    silu_and_mul,
)


def _routing(config) -> RoutingConfig:
    routing = RoutingConfig.from_dict(dict(config.mod), config.num_hidden_layers)
    if routing.router != "threshold":
        raise ValueError(f"only threshold-p routing can be served (causal); checkpoint has {routing.router!r}")
    return routing


class MoDLlamaDecoderLayer(LlamaDecoderLayer):
    """A LLaMA decoder layer; routed layers also own a router and a compact KV cache."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, routing_state=None) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config)
        config = config or vllm_config.model_config.hf_config
        self.layer_index = extract_layer_index(prefix)
        self.routing = _routing(config)
        self.is_routed = self.layer_index in self.routing.routed_layers
        if self.is_routed:
            self.routed_slot = self.routing.routed_layers.index(self.layer_index)  # its row in the step's counts
            self.routing_state = routing_state
            # A plain float32 Linear: the router is tiny, replicated, and its math is float32.
            self.router = nn.Linear(config.hidden_size, 1, bias=True, dtype=torch.float32)
            make_attention_routed(self.self_attn.attn, self.layer_index)
            accept_empty_inputs(self)  # its linears see only its routed tokens, maybe none
            routing_state.attn_names[self.routed_slot] = self.self_attn.attn.layer_name
            self.op_name = register_routed_layer(self, prefix)
            self.self_attn.attn.mod_op_name = self.op_name  # the C++ ops find its decode call by it
            # on the CPU the compiled graph calls the ops' C++ twins, if they are built
            self.cpp_ops = vllm_config.device_config.device_type == "cpu" and cpu_ops()
        else:
            attn = self.self_attn.attn
            attn.attn_backend = shared_metadata_backend(attn.attn_backend)

    def run_routed(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The routed layer on the residual stream ``h`` ([tokens, hidden]): the reference's
        float32 router and forced sink positions, then the layer on the routed tokens only
        (attention over its compact KV cache) and the gated update. Runs inside the opaque
        ``mod_serve::routed_layer`` op; returns a new tensor."""
        step = self.routing_state.step
        if step is None:  # a profiling / warm-up run: nothing to route or cache
            return h.clone()
        g = router_probs(self.router, h)
        if step.has_sink:  # else no token of this step is at a sink position: force_sink is a no-op
            g, forced = force_sink(g, positions, self.routing.sink_tokens)
            idx = step.route((g >= step.p) | forced)
        else:
            idx = step.route(g >= step.p)
        n = idx.numel()
        if n == 0:
            return h.clone()
        if n == h.shape[0]:  # every token routed in: no gather or scatter
            return gated_update(h, self._layer(positions, h, step, idx), g)
        h_in = h[idx]
        out = self._layer(positions[idx], h_in, step, idx)
        return h.index_copy(0, idx, gated_update(h_in, out, g[idx]))

    # ---- compiled: the layer as graph ops around two opaque steps (route, attend) ----------
    def run_routed_graph(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The same layer traced into vLLM's compiled graph. The routed count is an unbacked size,
        so the router, gather, norms, GEMMs, RoPE, MLP, gated update and scatter compile like the
        dense layers; only ``route`` (g >= p, bookkeeping) and ``attend`` run eagerly (``routed_op``).
        A forced sink position has g = 1 >= p, so it is routed in without a separate mask."""
        g = router_probs(self.router, h)
        if self.routing.sink_tokens:
            g, _ = force_sink(g, positions, self.routing.sink_tokens)
        idx = route(g, self.op_name, self.cpp_ops)
        h_in = h.index_select(0, idx)
        attn = self.self_attn
        x = self.input_layernorm(h_in)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = rotary_graph(attn.rotary_emb, positions.index_select(0, idx), q, k, attn.num_heads, attn.num_kv_heads)
        out, _ = attn.o_proj(attend(q, k, v, idx, self.op_name, self.cpp_ops))
        x, residual = self.post_attention_layernorm(out, h_in)
        out = self.mlp(x) + residual
        return h.index_copy(0, idx, gated_update(h_in, out, g.index_select(0, idx)))

    def route(self, g: torch.Tensor) -> torch.Tensor:
        """``mod_serve::route``: indices of the tokens routed in (a fresh tensor)."""
        step = self.routing_state.step
        if step is None:  # a profiling / warm-up run: nothing to route or cache
            return g.new_empty(0, dtype=torch.int64)
        idx = step.route(g >= step.p)
        return idx.clone() if step.crossings is not None else idx  # the step's log keeps its own

    def attend(self, q, k, v, idx) -> torch.Tensor:
        """``mod_serve::routed_attention``: the routed tokens' attention over the compact cache
        (``route`` returns no token outside a real step)."""
        attn = self.self_attn.attn
        if idx.numel() == 0:
            return q.new_empty(0, attn.num_heads * attn.head_size_v)
        return routed_attention(attn, self.routing_state.step, self.routed_slot, idx, q, k, v)

    def _layer(self, positions, hidden_states, step, routed_idx) -> torch.Tensor:
        """layer(h) for the routed tokens only (un-fused residual form: returns the full output)."""
        attn = self.self_attn
        x = rms_norm(self.input_layernorm, hidden_states)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = rotary(attn.rotary_emb, positions, q, k)
        out = routed_attention(attn.attn, step, self.routed_slot, routed_idx, q, k, v)
        out, _ = attn.o_proj(out)
        x, residual = add_rms_norm(self.post_attention_layernorm, out, hidden_states.clone())
        gate_up, _ = self.mlp.gate_up_proj(x)
        down, _ = self.mlp.down_proj(silu_and_mul(self.mlp.act_fn, gate_up))
        return down + residual


@support_torch_compile(
    dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"}, "intermediate_tensors": {0: "b"},
                      "inputs_embeds": {0: "b"}}
)
class MoDLlamaModel(nn.Module):
    """LlamaModel's loop, compiled like it; each routed layer is one opaque op in the graph."""

    hf_to_vllm_mapper = LlamaModel.hf_to_vllm_mapper

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **_):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.routing = _routing(config)
        self.routing_state = RoutingState(self.routing.routed_layers, self.routing.threshold, self.routing.sink_tokens)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: MoDLlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix,
                                                routing_state=self.routing_state),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            if not layer.is_routed:
                hidden, residual = layer(positions, hidden, residual)
                continue
            hidden = hidden if residual is None else hidden + residual
            residual = None
            if torch.compiler.is_compiling():  # traced into vLLM's graph (support_torch_compile)
                hidden = layer.run_routed_graph(hidden, positions)
            else:
                hidden = routed_layer(hidden, positions, layer.op_name)
        if residual is None:  # the last layer was routed: no pending residual
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class MoDLlamaForCausalLM(LlamaForCausalLM):
    """``architectures: ["MoDLlamaForCausalLM"]`` checkpoints (see mod_serve.config)."""

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=None):
        return MoDLlamaModel(vllm_config=vllm_config, prefix=prefix)

    @property
    def routing_state(self) -> RoutingState:
        return self.model.routing_state

    def forward(self, input_ids, positions, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds=None):
        # Per-step routing bookkeeping stays outside the compiled graph.
        self.routing_state.begin(positions.shape[0], positions.device)
        out = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        self.routing_state.end()
        return out
