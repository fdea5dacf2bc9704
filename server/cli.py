"""``mod-serve serve``: resolve the checkpoint, size the engine, run uvicorn until a signal."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
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
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model over N workers (vLLM's multiprocess executor); on a machine with one NUMA "
        "node give each its cores, e.g. VLLM_CPU_OMP_THREADS_BIND='0|1' for N=2",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        help="backpressure: at most N requests wait beyond the --max-num-seqs running ones; past that a "
        "request gets 503 with Retry-After (default: no bound)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT: refuse new requests (503), let in-flight ones finish for up to this many "
        "seconds, then abort the rest and exit (default 30; 0 aborts at once)",
    )
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
    if args.max_waiting is not None and args.max_waiting < 0:
        p.error("--max-waiting must be >= 0")
    if args.tensor_parallel_size < 1:
        p.error("--tensor-parallel-size must be >= 1")
    if not args.drain_timeout >= 0:  # also refuses nan
        p.error("--drain-timeout must be >= 0")

    # SIGTERM (docker stop, kill) behaves like Ctrl-C: once uvicorn runs, _Server drains on
    # either, then uvicorn shuts down; the engine stops in the app's lifespan.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        path = resolve_model(p, args.model)
        overrides = hf_overrides(p, path, args.mod_threshold)
        with bind_port(p, args.host, args.port) as sock:
            return _serve(args, path, overrides, sock)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130


def bind_port(p: argparse.ArgumentParser, host: str, port: int) -> socket.socket:
    """The server's socket, bound before the engine starts, as vLLM's own API server does: a
    port in use fails at once, not after the engine's start-up, and no port the engine opens for
    itself can take it meanwhile. uvicorn listens on it once the engine is ready; until then a
    connection is refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # (uvicorn's rule)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        p.error(f"--host {host} --port {port}: cannot bind: {e.strerror or e}")
    return sock


class _Server(uvicorn.Server):
    """uvicorn with a drain before its own graceful shutdown.

    The first SIGTERM/SIGINT starts the drain: the listening socket stays open, but new API
    requests get 503 (with ``Connection: close``) and ``/health`` 503, so that a load balancer
    moves away; in-flight requests go on. When none is left, or at ``drain_timeout``, the rest
    are aborted (a stream ends with an error event and ``[DONE]``, a waiting request gets a
    503, the engine aborts their requests) and uvicorn's usual shutdown follows. A second
    signal ends the drain at once; a third is uvicorn's (a second SIGINT forces the exit).
    The signal handler only sets fields; ``on_tick`` (uvicorn's 0.1 s loop) does the rest.
    """

    ABORT_GRACE_S = 5.0  # after aborting: time for the aborted requests to end their responses

    def __init__(self, config: uvicorn.Config, drain_timeout: float):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self._drain_sig: int | None = None
        self._drain_started = 0.0
        self._deadline = 0.0
        self._aborted_at: float | None = None
        self._announced = False

    def handle_exit(self, sig, frame):
        serving = self.config.app.state.serving
        if not self.started:  # still starting: nothing to drain
            super().handle_exit(sig, frame)
        elif self._drain_sig is None:
            self._drain_sig = sig
            self._drain_started = time.monotonic()
            self._deadline = self._drain_started + self.drain_timeout
            serving.start_drain()
        elif not self.should_exit and self._deadline > 0:
            self._deadline = 0.0  # second signal: abort what is left now
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_sig is not None and not self.should_exit:
            self._drain_step()
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        serving = self.config.app.state.serving
        now = time.monotonic()
        if not self._announced:  # (not in the signal handler: printing there can re-enter stdout)
            self._announced = True
            _log(f"draining: {len(serving.inflight)} request(s) in flight, up to {self.drain_timeout:g} s")
        if not serving.inflight:
            took = now - self._drain_started
            _log(f"drained in {took:.1f} s" + (" (after aborting the rest)" if self._aborted_at else ""))
            super().handle_exit(self._drain_sig, None)
        elif self._aborted_at is None and now >= self._deadline:
            n = serving.abort_all("shutdown")
            self._aborted_at = now
            _log(f"drain timeout: aborting {n} request(s) still in flight")
        elif self._aborted_at is not None and now - self._aborted_at > self.ABORT_GRACE_S:
            _log(f"{len(serving.inflight)} aborted request(s) did not end; shutting down anyway")
            super().handle_exit(self._drain_sig, None)


def _setup_access_log() -> None:
    """``mod_serve.http`` (the app's access and error lines) to stdout, like uvicorn's own."""
    logger = logging.getLogger("mod_serve.http")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [http] %(message)s", "%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _serve(args: argparse.Namespace, path: Path, overrides: dict | None, sock: socket.socket) -> int:
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
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=eager,
        hf_overrides=overrides or {},
        # vLLM's admission check counts waiting + running requests (n > 1 counts n) and raises
        # QueueOverflowError (-> 503) past this; running ones are at most max_num_seqs.
        max_num_queued_reqs=None if args.max_waiting is None else args.max_num_seqs + args.max_waiting,
    )
    name = args.served_model_name or path.name
    threshold = f", threshold p={args.mod_threshold}" if overrides else ""
    _log(f"starting the vLLM engine for {path}{threshold}; the port opens once it is ready")
    app = build_app(engine_args, name, args.api_key)
    _setup_access_log()
    # The app logs one line per request (ServingMiddleware), with the error message if any.
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=5, access_log=False)
    server = _Server(config, args.drain_timeout)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the signal it handled after a clean shutdown
        pass
    if not server.started:
        _log("the server did not start (see the errors above)")
        return 1
    _log("stopped")
    return 0
