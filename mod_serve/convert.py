"""Convert a Hugging Face LLaMA checkpoint directory into a MoD checkpoint.

Conversion is a file-level operation, so it works for any size without loading the model:
the base weights are copied as they are (``.bin`` shards are re-saved as safetensors), router
tensors go into one extra shard ``mod_routers.safetensors``, and config.json gains the ``mod``
object. Routers start at weight 0, bias ``ROUTER_INIT_BIAS`` (every token routed in, g ~ 1).
Everything is written into a temporary sibling directory that is renamed onto DST at the end,
so DST is never left half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MOD_ARCHITECTURE, MOD_MODEL_TYPE, RoutingConfig, parse_routed_layers
from .modeling import ROUTER_INIT_BIAS

ROUTER_SHARD = "mod_routers.safetensors"
INDEX = "model.safetensors.index.json"
LLAMA_TYPES = {"llama", MOD_MODEL_TYPE}


class ConversionError(ValueError):
    """The source is not a usable LLaMA checkpoint or an argument is invalid."""


def _read_config(src: Path) -> dict:
    if not src.is_dir():
        raise ConversionError(f"source {src} is not a directory")
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"source {src} has no config.json (not a Hugging Face checkpoint)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    model_type = config.get("model_type")
    if model_type not in LLAMA_TYPES:
        raise ConversionError(
            f"source {src} has model_type {model_type!r}; only LLaMA checkpoints (model_type 'llama') "
            "can be converted"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(key), int):
            raise ConversionError(f"{path} lacks integer field {key!r}")
    return config


def _weight_files(src: Path) -> list[Path]:
    if (src / INDEX).is_file():
        index = json.loads((src / INDEX).read_text())
        return sorted({src / f for f in index["weight_map"].values()})
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    files = [f for f in files if f.name != ROUTER_SHARD]
    if not files:
        raise ConversionError(f"source {src} has no weights (*.safetensors or pytorch_model*.bin)")
    return files


def _tensor_names(files: list[Path]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for f in files:
        if not f.is_file():
            raise ConversionError(f"weight file {f} listed by the index is missing")
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as sf:
                    names.update({k: f for k in sf.keys()})
            else:
                names.update({k: f for k in torch.load(f, map_location="cpu", weights_only=True)})
        except Exception as e:  # a truncated or foreign file
            raise ConversionError(f"cannot read weight file {f}: {e}") from None
    return names


def _check_llama_weights(names: dict[str, Path], num_layers: int) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(num_layers):
        required += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        required += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    missing = [n for n in required if n not in names]
    if missing:
        raise ConversionError(
            f"source weights lack {len(missing)} LLaMA tensors, e.g. {missing[:3]} (wrong or truncated checkpoint)"
        )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    threshold: float = 0.5,
    routed_layers: str | list[int] = "every-other",
    overwrite: bool = False,
    sink_tokens: int = 0,
) -> Path:
    """Write a MoD checkpoint of ``src`` to ``dst``; returns ``dst``."""
    src, dst = Path(src), Path(dst)
    config = _read_config(src)
    num_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    layers = parse_routed_layers(routed_layers, num_layers) if isinstance(routed_layers, str) else routed_layers
    try:
        routing = RoutingConfig.from_dict(
            {"routed_layers": list(layers), "threshold": threshold, "sink_tokens": sink_tokens}, num_layers
        )
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if dst.exists() and not overwrite:
        raise ConversionError(f"destination {dst} exists (pass overwrite=True / --force to replace it)")
    if dst.resolve() == src.resolve():
        raise ConversionError("destination must differ from the source")

    files = _weight_files(src)
    names = _tensor_names(files)
    _check_llama_weights(names, num_layers)
    old_routers = {n for n in names if ".router." in n}

    dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(dtype_name).replace("torch.", ""), torch.float32)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        weight_map: dict[str, str] = {}
        for f in files:
            if f.suffix == ".safetensors" and not old_routers:
                # a lone "model.safetensors" would make loaders skip the index (and the routers)
                out_name = "model-00001-of-00001.safetensors" if f.name == "model.safetensors" else f.name
                shutil.copy2(f, tmp / out_name)
            else:  # .bin shard, or a MoD source whose old routers must be dropped
                out_name = f.with_suffix(".safetensors").name.replace("pytorch_model", "model")
                if f.suffix == ".safetensors":
                    with safe_open(str(f), framework="pt") as sf:
                        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
                else:
                    tensors = torch.load(f, map_location="cpu", weights_only=True)
                tensors = {k: v.contiguous() for k, v in tensors.items() if k not in old_routers}
                save_file(tensors, str(tmp / out_name), metadata={"format": "pt"})
            weight_map.update({k: out_name for k, p in names.items() if p == f and k not in old_routers})
        routers = {}
        for i in routing.routed_layers:
            routers[f"model.layers.{i}.router.weight"] = torch.zeros(1, hidden, dtype=dtype)
            routers[f"model.layers.{i}.router.bias"] = torch.full((1,), ROUTER_INIT_BIAS, dtype=dtype)
        save_file(routers, str(tmp / ROUTER_SHARD), metadata={"format": "pt"})
        weight_map.update({k: ROUTER_SHARD for k in routers})
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

        for f in src.iterdir():  # tokenizer, chat template, generation config, README...
            if f.is_file() and f.name not in {INDEX, "config.json"} and f not in files and f.name != ROUTER_SHARD:
                if not f.name.endswith((".safetensors", ".bin", ".gguf")):
                    shutil.copy2(f, tmp / f.name)
        config.update(model_type=MOD_MODEL_TYPE, architectures=[MOD_ARCHITECTURE], mod=routing.to_dict())
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_routers(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and routing (``mod`` dict) of a routers file: router tensors plus metadata
    ``routed_layers`` ("1,3,5"), ``threshold``, ``router``, ``capacity``, ``sink_tokens`` (what training exports and
    ``mod_serve/assets/default_routers.safetensors`` uses)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    layers = meta.get("routed_layers", "")
    mod = {
        "routed_layers": [int(x) for x in layers.split(",") if x.strip()],
        "threshold": float(meta.get("threshold", 0.5)),
        "router": meta.get("router", "threshold"),
        "capacity": float(meta.get("capacity", 0.125)),
        "sink_tokens": int(meta.get("sink_tokens", 0)),
    }
    return tensors, mod


def read_adapter(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A low-rank weight-delta file: weight name -> (A [r, in], B [out, r]), delta = B @ A.

    Tensors ``{weight name}.lora_A`` / ``.lora_B``, the LoRA scale already folded into B (what
    training exports as ``adapter.safetensors`` and ``mod_serve/assets/default_adapter.safetensors``
    is)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    bad = [k for k in tensors if not k.endswith((".lora_A", ".lora_B"))]
    if bad or len(tensors) != 2 * len(names):
        raise ConversionError(f"{path}: not an adapter file (expected NAME.lora_A / NAME.lora_B pairs)")
    return {n: (tensors[n + ".lora_A"], tensors[n + ".lora_B"]) for n in names}


def merge_adapter(checkpoint: str | os.PathLike, adapter: str | os.PathLike) -> int:
    """Add an adapter's deltas into a checkpoint's safetensors shards in place (float32 math,
    stored in each weight's dtype); returns how many weights changed."""
    checkpoint = Path(checkpoint)
    deltas = read_adapter(adapter)
    files = [f for f in _weight_files(checkpoint) if f.name != ROUTER_SHARD]
    names = _tensor_names(files)
    missing = [n for n in deltas if n not in names]
    if missing:
        raise ConversionError(f"adapter weights not in {checkpoint}: {missing[:3]}")
    for f in files:
        todo = [n for n in deltas if names[n] == f]
        if not todo:
            continue
        with safe_open(str(f), framework="pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        for n in todo:
            a, b = deltas[n]
            w = tensors[n]
            if (b.shape[0], a.shape[1]) != tuple(w.shape):
                raise ConversionError(f"adapter delta for {n} is {b.shape[0]}x{a.shape[1]}, weight is {tuple(w.shape)}")
            tensors[n] = (w.float() + b.float() @ a.float()).to(w.dtype).contiguous()
        tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, f)
    return len(deltas)
