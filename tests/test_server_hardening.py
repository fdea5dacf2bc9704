"""Server hardening (issue 12): a 4xx never costs the connection; fuzzed, soaked, KV-exhausted; drain.

Two parts. The mechanism first, on a tiny app (no engine) under a real uvicorn in a thread: every
kind of error keeps the keep-alive connection, is logged once, and the drain state machine does
what ``mod-serve serve`` relies on. Then one real `mod-serve serve` process (the default MoD
model, float32, a small KV cache) for the fuzz, the soak and KV exhaustion. The drain and
backpressure of the real server are tested in test_server_cli.py (on its server, which ends with
SIGTERM anyway).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from vllm.exceptions import QueueOverflowError, VLLMValidationError

from server.app import APIError, harden
from server.cli import _Server
from test_server import KEY, ServerProcess, free_port, metrics, test_model_dir

ERROR_KEYS = {"message", "type", "param", "code"}


def assert_error_body(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"], err
    return err


def local_port(r: httpx.Response) -> int:
    """The client side port of the connection a response came on (same port: same connection)."""
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


# ---------------------------------------------------------------- the mechanism, no engine


class TinyApp:
    """``harden()``ed FastAPI app with routes that fail the ways vLLM's serving code does."""

    def __init__(self):
        self.app = app = FastAPI()
        self.serving = harden(app)
        self.cancelled: list[str] = []

        @app.post("/v1/user-error")
        async def user_error():
            raise VLLMValidationError("top_p must be in (0, 1], got 7.0.", parameter="top_p", value=7.0)

        @app.post("/v1/value-error")
        async def value_error():
            raise ValueError("Token id 1000000000 is out of vocabulary")

        @app.post("/v1/busy")
        async def busy():
            raise QueueOverflowError()

        @app.post("/v1/api-error")
        async def api_error():
            raise APIError(400, "n must be at most 128, got 500", param="n")

        @app.post("/v1/fault")
        async def fault():
            raise RuntimeError("secret internal detail")

        @app.post("/v1/ok")
        async def ok():
            return {"ok": True}

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.post("/v1/stream-fault")
        async def stream_fault():
            async def gen():
                yield 'data: {"n": 1}\n\n'
                raise RuntimeError("broke mid-stream")

            return StreamingResponse(gen(), media_type="text/event-stream")

        @app.post("/v1/stream/{name}/{chunks}")
        async def stream(name: str, chunks: int):
            async def gen():
                try:
                    for i in range(chunks):
                        yield f'data: {{"i": {i}}}\n\n'
                        await asyncio.sleep(0.05)
                    yield "data: [DONE]\n\n"
                except BaseException:  # what vLLM's generate() sees: it aborts the engine request
                    self.cancelled.append(name)
                    raise

            return StreamingResponse(gen(), media_type="text/event-stream")


class ThreadServer:
    def __init__(self, app, drain_timeout: float | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, access_log=False, lifespan="off", log_level="info")
        self.server = uvicorn.Server(config) if drain_timeout is None else _Server(config, drain_timeout)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_errors_keep_the_connection_and_log_one_line(caplog):
    tiny = TinyApp()
    caplog.set_level(logging.INFO)
    expected = [
        ("/v1/user-error", 400, "top_p"),
        ("/v1/value-error", 400, None),
        ("/v1/busy", 503, None),
        ("/v1/api-error", 400, "n"),
        ("/v1/fault", 500, None),
        ("/v1/ok", 200, None),
    ]
    with ThreadServer(tiny.app) as srv, httpx.Client(base_url=srv.base, timeout=10) as http:
        ports = set()
        for _ in range(3):
            for path, status, param in expected:
                r = http.post(path)
                ports.add(local_port(r))
                if status == 200:
                    assert r.json() == {"ok": True}
                    continue
                err = assert_error_body(r, status)
                assert err["param"] == param
                assert ("Retry-After" in r.headers) == (status == 503)
                if status == 500:
                    assert err["type"] == "server_error" and "secret" not in err["message"]
            r = http.post("/v1/stream-fault")
            ports.add(local_port(r))
            assert r.status_code == 200
            events = sse_events(r.text)
            assert events[0] == '{"n": 1}' and events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == 500
        assert len(ports) == 1, ports  # one keep-alive connection for all 21 requests
        counts = tiny.serving.counters.render().decode()
    http_lines = [r for r in caplog.records if r.name == "mod_serve.http"]
    assert len(http_lines) == 21  # one line per request
    by_level = Counter(r.levelname for r in http_lines)
    assert by_level == {"WARNING": 9, "ERROR": 6, "INFO": 6}, by_level
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 6 and all(r.levelname == "ERROR" for r in with_traceback)  # 500s only, once each
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
    assert all("top_p must be in (0, 1]" in r.getMessage() for r in http_lines if "/v1/user-error" in r.getMessage())
    assert 'mod_serve_http_responses_total{status_class="2xx"} 6.0' in counts
    assert 'mod_serve_http_responses_total{status_class="4xx"} 9.0' in counts
    assert 'mod_serve_http_responses_total{status_class="5xx"} 6.0' in counts


def test_drain_finishes_short_streams_and_aborts_the_rest():
    """SIGTERM's path on a tiny app: new requests and /health 503, one stream ends inside the
    drain timeout, the other is aborted at it (its generator cancelled, an error event and
    [DONE] sent), then the server exits."""
    tiny = TinyApp()
    results = {}

    def read(name, chunks):
        with httpx.stream("POST", f"{srv.base}/v1/stream/{name}/{chunks}", timeout=30) as r:
            results[name] = (r.status_code, sse_events(r.read().decode()))

    with ThreadServer(tiny.app, drain_timeout=1.5) as srv:
        threads = [threading.Thread(target=read, args=a) for a in (("short", 8), ("long", 1000))]
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while len(tiny.serving.inflight) < 2 and time.time() < deadline:
            time.sleep(0.02)
        srv.server.handle_exit(signal.SIGTERM, None)
        time.sleep(0.1)
        new = httpx.post(f"{srv.base}/v1/ok", timeout=10)
        err = assert_error_body(new, 503)
        assert "shutting down" in err["message"] and new.headers["connection"] == "close" and new.headers["retry-after"]
        assert_error_body(httpx.get(f"{srv.base}/health", timeout=10), 503)
        for t in threads:
            t.join(20)
        srv.thread.join(20)
        assert not srv.thread.is_alive()  # exited by itself after the drain
    status, short = results["short"]
    assert status == 200 and short[-1] == "[DONE]" and len(short) == 9 and "error" not in "".join(short)
    status, long = results["long"]
    assert status == 200 and long[-1] == "[DONE]" and 1 < len(long) < 1000
    assert json.loads(long[-2])["error"]["message"] == "server shutting down"
    assert tiny.cancelled == ["long"]
    counts = tiny.serving.counters.render().decode()
    assert 'mod_serve_requests_aborted_total{reason="shutdown"} 1.0' in counts
    assert 'mod_serve_http_responses_total{status_class="5xx"} 2.0' in counts  # the two refused
