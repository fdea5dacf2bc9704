"""``mod-serve serve``: resolve the checkpoint, size the engine, run uvicorn until a signal."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import uvicorn


def _log(msg: str) -> None:
    print(f"[mod-serve] {msg}", flush=True)


def parse_args(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="mod-serve serve",
        description="Serve a MoD checkpoint (default: the default MoD model) over an OpenAI-compatible API.",
    )
    p.add_argument("--model", help="checkpoint directory (default: the default MoD model, prepared on first run)")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("MOD_SERVE_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOD_SERVE_API_KEY, else no key)",
    )
    p.add_argument("--max-model-len", type=int, help="context length (default: the checkpoint's)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache pool size in GiB (default 1)")
    p.add_argument("--mod-threshold", type=float, help="override the routing threshold p server-wide (MoD only)")
    p.add_argument("--dtype", default="auto", help="weights/activations dtype (default: the checkpoint's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences batched at once (default 64)")
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip torch.compile/CUDA graphs (default: on for CPU, where compiling costs ~1 min per start)",
    )
    return p, p.parse_args(argv)


def resolve_model(p: argparse.ArgumentParser, model: str | None) -> Path:
    if model is None:
        from mod_serve.default_model import prepare_default_model

        _log("preparing the default MoD model (first run: ~1 min, cached afterwards)")
        return prepare_default_model()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        p.error(f"--model {model}: not a checkpoint directory (no config.json)")
    return path.resolve()


def hf_overrides(p: argparse.ArgumentParser, path: Path, threshold: float | None) -> dict | None:
    """``{"mod": {..., "threshold": p}}`` for ``--mod-threshold``: vLLM merges it into the HF config."""
    if threshold is None:
        return None
    if threshold < 0:
        p.error(f"--mod-threshold must be >= 0 (got {threshold})")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "mod_llama" or not isinstance(config.get("mod"), dict):
        p.error(f"--mod-threshold needs a MoD checkpoint; {path} has model_type {config.get('model_type')!r}")
    return {"mod": {**config["mod"], "threshold": threshold}}


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 < args.port < 65536:
        p.error("--port must be in 1..65535")
    if args.kv_cache_gib <= 0:
        p.error("--kv-cache-gib must be > 0")
    if args.max_model_len is not None and args.max_model_len < 1:
        p.error("--max-model-len must be >= 1")
    if args.max_num_seqs < 1:
        p.error("--max-num-seqs must be >= 1")
    if args.mod_threshold is not None and args.mod_threshold < 0:
        p.error(f"--mod-threshold must be >= 0 (got {args.mod_threshold})")

    # SIGTERM (docker stop, kill) behaves like Ctrl-C: uvicorn catches both once it runs and
    # shuts down gracefully; the engine stops in the app's lifespan.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        path = resolve_model(p, args.model)
        overrides = hf_overrides(p, path, args.mod_threshold)
        return _serve(args, path, overrides)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130


class _Server(uvicorn.Server):
    """Tells the app about the signal, so that open streams end now rather than at the timeout."""

    def handle_exit(self, sig, frame):
        self.config.app.state.shutting_down = True
        super().handle_exit(sig, frame)


def _serve(args: argparse.Namespace, path: Path, overrides: dict | None) -> int:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    from .app import build_app

    eager = current_platform.is_cpu() if args.enforce_eager is None else args.enforce_eager
    engine_args = AsyncEngineArgs(
        model=str(path),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        max_num_seqs=args.max_num_seqs,
        enforce_eager=eager,
        hf_overrides=overrides or {},
    )
    name = args.served_model_name or path.name
    threshold = f", threshold p={args.mod_threshold}" if overrides else ""
    _log(f"starting the vLLM engine for {path}{threshold}; the port opens once it is ready")
    app = build_app(engine_args, name, args.api_key)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it handled after a clean shutdown
        pass
    if not server.started:
        _log("the server did not start (see the errors above)")
        return 1
    _log("stopped")
    return 0
