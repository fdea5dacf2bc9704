"""The MoD checkpoint configuration: a LLaMA config plus a ``mod`` object.

A MoD checkpoint's config.json is the base LLaMA's, with three changes:
``"model_type": "mod_llama"`` (so plain transformers refuses it instead of silently
loading a dense model), ``"architectures": ["MoDLlamaForCausalLM"]`` and::

    "mod": {"routed_layers": [1, 3, ...], "threshold": 0.5,
            "router": "threshold", "capacity": 0.125, "sink_tokens": 1}

``router`` is ``"threshold"`` (MoDification's causal threshold-p, what is served) or
``"topk"`` (the original MoD top-k operator, a training-time comparison only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

MOD_MODEL_TYPE = "mod_llama"
MOD_ARCHITECTURE = "MoDLlamaForCausalLM"
ROUTERS = ("threshold", "topk")


@dataclass(frozen=True)
class RoutingConfig:
    """Validated view of the ``mod`` object of a checkpoint config."""

    routed_layers: tuple[int, ...]
    threshold: float = 0.5
    router: str = "threshold"
    capacity: float = 0.125
    sink_tokens: int = 0

    @classmethod
    def from_dict(cls, mod: dict, num_layers: int) -> "RoutingConfig":
        if not isinstance(mod, dict):
            raise ValueError(f"config field 'mod' must be an object, got {type(mod).__name__}")
        unknown = set(mod) - {"routed_layers", "threshold", "router", "capacity", "sink_tokens"}
        if unknown:
            raise ValueError(f"config field 'mod' has unknown keys {sorted(unknown)}")
        layers = mod.get("routed_layers", [])
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
            raise ValueError(f"mod.routed_layers must be a list of layer indices, got {layers!r}")
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"mod.routed_layers {bad} out of range for {num_layers} layers")
        if len(set(layers)) != len(layers):
            raise ValueError(f"mod.routed_layers has duplicates: {layers!r}")
        threshold = mod.get("threshold", 0.5)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 0:
            raise ValueError(f"mod.threshold must be a number >= 0, got {threshold!r}")
        router = mod.get("router", "threshold")
        if router not in ROUTERS:
            raise ValueError(f"mod.router must be one of {ROUTERS}, got {router!r}")
        capacity = mod.get("capacity", 0.125)
        if not isinstance(capacity, (int, float)) or not 0 < capacity <= 1:
            raise ValueError(f"mod.capacity must be in (0, 1], got {capacity!r}")
        sink_tokens = mod.get("sink_tokens", 0)
        if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
            raise ValueError(f"mod.sink_tokens must be an integer >= 0, got {sink_tokens!r}")
        return cls(tuple(sorted(layers)), float(threshold), router, float(capacity), sink_tokens)

    def to_dict(self) -> dict:
        return {
            "routed_layers": list(self.routed_layers),
            "threshold": self.threshold,
            "router": self.router,
            "capacity": self.capacity,
            "sink_tokens": self.sink_tokens,
        }


@strict
class MoDLlamaConfig(LlamaConfig):
    """LlamaConfig with the ``mod`` routing object; every LLaMA field keeps its meaning."""

    model_type = MOD_MODEL_TYPE
    mod: dict = field(default_factory=lambda: {"routed_layers": [], "threshold": 0.5})

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.mod = RoutingConfig.from_dict(self.mod, self.num_hidden_layers).to_dict()
        if not self.architectures:
            self.architectures = [MOD_ARCHITECTURE]

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig.from_dict(self.mod, self.num_hidden_layers)


def parse_routed_layers(spec: str, num_layers: int) -> list[int]:
    """``all`` | ``every-other`` (odd layers, the paper's choice) | ``none`` | ``1,3,5`` | ``2-10``."""
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers))
    if spec == "every-other":
        return list(range(1, num_layers, 2))
    if spec == "none":
        return []
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise ValueError(
                f"--routed-layers: cannot parse {part!r} in {spec!r}; use all, every-other, none, "
                "a list like 1,3,5 or a range like 2-10"
            ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--routed-layers: layers {bad} out of range for a {num_layers}-layer model")
    return sorted(set(layers))
