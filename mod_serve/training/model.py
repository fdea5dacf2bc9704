"""Load the model to train: a LLaMA or MoD checkpoint, with the run's routing, and choose what trains.

A plain LLaMA checkpoint is loaded straight into ``MoDLlamaForCausalLM`` (its routers are new);
a MoD checkpoint keeps its routers for the layers it already routes. Only routers (and LoRA
adapters, or everything) get gradients; the dense teacher for distillation is the same weights
with routing switched off (and adapters disabled), so it costs no extra memory.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..config import MoDLlamaConfig, RoutingConfig
from ..modeling import MoDLlamaForCausalLM
from .config import TrainConfig


def resolve_base(base: str) -> Path:
    if base == "default":
        from ..default_model import prepare_base

        return prepare_base()
    return Path(base)


def load_on_base(base: str, mod=None, dtype=torch.float32) -> MoDLlamaForCausalLM:
    """The base checkpoint's weights (LLaMA or MoD) as a ``MoDLlamaForCausalLM`` routing as ``mod``
    says: a ``mod`` dict, a function of the layer count returning one, or None for dense. Routers
    the base lacks are new (the run's router init sets them); routers it has are kept."""
    path = resolve_base(base)
    skip = {"model_type", "architectures", "transformers_version", "mod"}
    raw = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k not in skip}
    if callable(mod):
        mod = mod(raw["num_hidden_layers"])
    config = MoDLlamaConfig(**raw, mod=mod if mod is not None else {"routed_layers": []})
    return MoDLlamaForCausalLM.from_pretrained(path, config=config, dtype=dtype)


def load_model(cfg: TrainConfig, dtype=torch.float32) -> MoDLlamaForCausalLM:
    return load_on_base(cfg.base, cfg.routing_dict, dtype)


def dense_routing() -> RoutingConfig:
    return RoutingConfig(routed_layers=())


def setup_trainable(model, cfg: TrainConfig):
    """Freeze per ``cfg.trainable``; returns the (maybe peft-wrapped) model."""
    for p in model.parameters():
        p.requires_grad_(cfg.trainable == "all")
    if cfg.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 target_modules=cfg.lora_targets, lora_dropout=0.0))
    for r in base_model(model).routers().values():
        r.requires_grad_(True)
    if cfg.gradient_checkpointing:
        _checkpoint_layers(base_model(model))
    return model


def base_model(model) -> MoDLlamaForCausalLM:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def teacher(model):
    """The dense original: routing off and (for LoRA) adapters disabled."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx, torch.no_grad():
        yield lambda ids: base_model(model)(ids, routing=dense_routing()).logits


def _checkpoint_layers(model) -> None:
    """Gradient checkpointing for the reference forward: recompute each layer's MLP and attention
    in backward (wraps the submodules, since the reference forward calls them directly)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        for name in ("mlp",):
            mod = getattr(layer, name)
            orig = mod.forward
            mod.forward = lambda *a, _f=orig: checkpoint(_f, *a, use_reentrant=False)
