"""The training run description, read from a YAML or TOML file (see configs/).

Kept as plain dataclasses so a config file maps one-to-one onto what the trainer does, and an
unknown key is an error rather than a silently ignored typo.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TRAINABLE = ("routers", "lora", "all")
INITS = ("keep", "bias", "calibrate", "importance")


@dataclass
class Source:
    """One data source: local files (``path`` glob; text, html or jsonl) or an HF ``datasets`` one."""

    path: str | None = None
    format: str = "text"  # text | html | jsonl
    field: str = "text"  # jsonl/HF: text field, or "messages" for chat data (chat template)
    hf: str | None = None  # datasets.load_dataset(hf, hf_name, split=hf_split)
    hf_name: str | None = None
    hf_split: str = "train"
    weight: float = 1.0


@dataclass
class DataConfig:
    sources: list[Source] = field(default_factory=list)
    seq_len: int = 256
    train_tokens: int = 100_000  # token budget of the training split (the mixture is drawn to it)
    heldout_tokens: int = 8_192  # held out per run, drawn from every source by weight
    seed: int = 0


@dataclass
class TrainConfig:
    base: str = "default"  # checkpoint dir, or "default" for the default base (SmolLM2-135M-Instruct)
    output: str = ".cache/runs/default"  # .cache/ is git-ignored
    routed_layers: str | list[int] = "every-other"
    threshold: float = 0.5
    router: str = "threshold"  # threshold | topk
    capacity: float = 0.125  # top-k only
    sink_tokens: int = 1  # first positions always routed in with gate 1 (mod_serve.config)
    alpha: float = 0.01  # weight of sum_j F_j * G_j
    aux_skip_first: int = 1  # leave each sequence's first tokens (the attention sink) out of F, G
    distill: float = 0.0  # weight of KL(dense teacher || student) on logits
    lm_weight: float = 1.0
    trainable: str = "routers"  # routers | lora | all
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    init: str = "importance"  # keep | bias | calibrate | importance
    init_gate: float = 0.9  # "bias": g for every token at the start
    init_fraction: float = 0.5  # "calibrate"/"importance": routed fraction at the start
    init_sharpness: float = 4.0  # "importance": std of the router logits at the start
    init_threshold: float | None = None  # "importance": place the init_fraction cut at this p (default: threshold)
    init_sequences: int = 16
    lr: float = 5e-3
    precondition: bool = True  # train router weights as u / max|h| per coordinate (precondition.py)
    massive_ratio: float = 0.0  # > 0: freeze router weights on massive-activation coordinates
    router_lr: float | None = None  # router weights; defaults to lr
    bias_lr: float | None = None  # router biases; defaults to router_lr (Adam moves a weight's
    # logit by ~lr * sum|h|, a bias's by ~lr, so the two want different rates)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | constant
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int | None = None  # default: train_tokens / (seq_len * batch * accum)
    checkpoint_every: int = 25
    log_every: int = 5
    eval_every: int = 0
    seed: int = 0
    bf16: bool = False  # GPU: bf16 autocast through accelerate
    flash_attention: bool = False  # GPU: SDPA flash kernel (the masked path needs a mask: see docs)
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # a DeepSpeed ZeRO JSON config (configs/deepspeed_zero2.json)
    export: list[str] = field(default_factory=lambda: ["routers"])  # routers | adapter | checkpoint
    adapter_dtype: str = "bfloat16"  # adapter.safetensors (the base weights it is merged into are bf16)
    threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)

    def routing_dict(self, num_layers: int) -> dict:
        from ..config import parse_routed_layers

        layers = self.routed_layers
        if isinstance(layers, str):
            layers = parse_routed_layers(layers, num_layers)
        return {"routed_layers": list(layers), "threshold": self.threshold, "router": self.router,
                "capacity": self.capacity, "sink_tokens": self.sink_tokens}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _build(cls, raw: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    return cls(**raw)


def from_dict(raw: dict) -> TrainConfig:
    raw = dict(raw)
    data = dict(raw.pop("data", {}) or {})
    sources = [_build(Source, s, "data.sources[]") for s in data.pop("sources", [])]
    for key in ("lr", "router_lr", "bias_lr", "alpha", "distill", "threshold", "capacity", "weight_decay", "init_threshold"):
        if isinstance(raw.get(key), str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            raw[key] = float(raw[key])
    cfg = _build(TrainConfig, raw, "config")
    cfg.data = _build(DataConfig, data, "data")
    cfg.data.sources = sources
    if cfg.trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {cfg.trainable!r}")
    if cfg.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {cfg.init!r}")
    for s in sources:
        if (s.path is None) == (s.hf is None):
            raise ValueError(f"a data source needs exactly one of path/hf: {s}")
    return cfg


def load(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read YAML (.yaml/.yml) or TOML (.toml); ``overrides`` are ``key=value`` (value in YAML syntax,
    dotted keys reach into ``data``)."""
    path = Path(path)
    text = path.read_text()
    raw = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
    for item in overrides:
        key, _, value = item.partition("=")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return from_dict(raw)
