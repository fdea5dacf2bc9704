"""What a run produces: a routers file (the small artefact the default model ships), a LoRA
adapter, and/or a servable MoD checkpoint in the foundation format (base weights unchanged or
LoRA-merged, routers in ``mod_routers.safetensors``, listed in the index).

The routers file is the format ``mod_serve/assets/default_routers.safetensors`` uses: tensors
``model.layers.{i}.router.weight`` [1, hidden] / ``.bias`` [1] and metadata ``routed_layers``
("1,3,5"), ``threshold``, ``router``, ``capacity``, ``sink_tokens``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..convert import INDEX, ROUTER_SHARD, read_routers  # noqa: F401  (re-exported)
from ..modeling import MoDLlamaForCausalLM

ROUTERS_FILE = "routers.safetensors"
ADAPTER_FILE = "adapter.safetensors"


def router_tensors(model: MoDLlamaForCausalLM, dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for i, r in model.routers().items():
        out[f"model.layers.{i}.router.weight"] = r.weight.detach().to(dtype).contiguous().clone()
        out[f"model.layers.{i}.router.bias"] = r.bias.detach().to(dtype).contiguous().clone()
    return out


def save_routers(model: MoDLlamaForCausalLM, path: str | os.PathLike, extra: dict | None = None) -> Path:
    routing = model.routing
    meta = {
        "format": "pt",
        "routed_layers": ",".join(map(str, routing.routed_layers)),
        "threshold": repr(routing.threshold),
        "router": routing.router,
        "capacity": repr(routing.capacity),
        "sink_tokens": str(routing.sink_tokens),
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(router_tensors(model), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def save_adapter(model, path: str | os.PathLike, dtype=torch.bfloat16) -> Path:
    """The LoRA adapters of a peft-wrapped model as plain weight deltas (``convert.read_adapter``
    format: ``{weight}.lora_A`` [r, in], ``{weight}.lora_B`` [out, r] with the scale folded in), so
    that serving merges them without peft."""
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        weight = name.removeprefix("base_model.model.") + ".weight"
        a = module.lora_A["default"].weight.detach().float()
        b = module.lora_B["default"].weight.detach().float() * module.scaling["default"]
        out[weight + ".lora_A"] = a.to(dtype).contiguous()
        out[weight + ".lora_B"] = b.to(dtype).contiguous()
    if not out:
        raise ValueError("the model has no LoRA adapters to export")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(out, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def save_checkpoint(model: MoDLlamaForCausalLM, dst: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                    dtype=torch.bfloat16) -> Path:
    """A servable MoD checkpoint (foundation format), written atomically."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        state = {k: v for k, v in model.state_dict().items() if ".router." not in k}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
        shard = "model-00001-of-00001.safetensors"
        save_file(state, str(tmp / shard), metadata={"format": "pt"})
        routers = router_tensors(model, dtype)
        save_file(routers, str(tmp / ROUTER_SHARD), metadata={"format": "pt"})
        weight_map = {**{k: shard for k in state}, **{k: ROUTER_SHARD for k in routers}}
        total = sum((tmp / f).stat().st_size for f in (shard, ROUTER_SHARD))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = model.config.to_dict()
        config["dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config"))):
                    shutil.copy2(f, tmp / f.name)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def merged(model):
    """The plain MoD model of a (maybe LoRA-wrapped) training model, adapters merged in."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model
