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
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.exceptions import QueueOverflowError, VLLMValidationError

from server.app import APIError, harden
from server.cli import _Server
from test_server import (KEY, ServerProcess, access_outcomes, assert_all_blocks_back, free_port, metrics,  # noqa: F401
                         test_model_dir, tokenizer, wait_idle, wait_metrics)  # (tokenizer: a fixture)

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

        @app.post("/v1/slow-json")
        @with_cancellation  # as the real routes: a disconnect cancels the handler
        async def slow_json(raw_request: Request):
            try:
                await asyncio.sleep(60)
            except BaseException:
                self.cancelled.append("json")
                raise
            return {"late": True}

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
    assert by_level == {"WARNING": 12, "ERROR": 6, "INFO": 3}, by_level  # 503: a warning; a broken stream: an error
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 6 and all(r.levelname == "ERROR" for r in with_traceback)  # 500s only, once each
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
    assert all("top_p must be in (0, 1]" in r.getMessage() for r in http_lines if "/v1/user-error" in r.getMessage())
    assert 'mod_serve_http_responses_total{status_class="2xx"} 6.0' in counts
    assert 'mod_serve_http_responses_total{status_class="4xx"} 9.0' in counts
    assert 'mod_serve_http_responses_total{status_class="5xx"} 6.0' in counts


def test_drain_finishes_short_streams_and_aborts_the_rest():
    """SIGTERM's path on a tiny app: new requests and /health 503, one stream ends inside the
    drain timeout; a longer stream and a non-streamed request are aborted at it (their handlers
    cancelled, as vLLM's generate() is by a disconnect): the stream gets an error event and
    [DONE], the other a 503; then the server exits."""
    tiny = TinyApp()
    results = {}

    def read(name, chunks):
        with httpx.stream("POST", f"{srv.base}/v1/stream/{name}/{chunks}", timeout=30) as r:
            results[name] = (r.status_code, sse_events(r.read().decode()))

    def wait_json():
        results["json"] = httpx.post(f"{srv.base}/v1/slow-json", timeout=30)

    with ThreadServer(tiny.app, drain_timeout=3) as srv:  # the short stream takes ~0.4 s
        threads = [threading.Thread(target=read, args=a) for a in (("short", 8), ("long", 1000))]
        threads.append(threading.Thread(target=wait_json))
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while len(tiny.serving.inflight) < 3:
            assert time.time() < deadline, tiny.serving.inflight
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
    err = assert_error_body(results["json"], 503)
    assert err["message"] == "server shutting down: request aborted at the drain timeout"
    assert sorted(tiny.cancelled) == ["json", "long"]
    counts = tiny.serving.counters.render().decode()
    assert 'mod_serve_requests_aborted_total{reason="shutdown"} 2.0' in counts
    assert 'mod_serve_http_responses_total{status_class="5xx"} 3.0' in counts  # two refused, one aborted


# ---------------------------------------------------------------- one real server


pytest_slow = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}
KV_GIB = "0.02"  # room for ~465 tokens in every one of the 30 layers (vLLM's count), for KV exhaustion
MAX_MODEL_LEN = 448  # (vLLM refuses a max_model_len the KV cache cannot hold once)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("hardening"), test_model_dir(), "--kv-cache-gib", KV_GIB, "--max-model-len", str(MAX_MODEL_LEN)
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop(signal.SIGINT)
        left = srv.wait_no_process()
        log = srv.log_tail(10**9)
        srv.kill()
        assert rc == 0, f"server exit status {rc}:\n{log[-4000:]}"
        assert left == []
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]


@pytest.fixture(scope="module")
def model(server):
    return httpx.get(server.base + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]


def counter(m: dict[str, float], name: str, label: str, value: str) -> float:
    return m.get(f"{name}{{{label}={value}}}", 0.0)


GREEDY = {"messages": [{"role": "user", "content": "Name three primary colours."}], "max_tokens": 12, "temperature": 0}


def greedy_answer(http: httpx.Client, model: str) -> str:
    r = http.post("/v1/chat/completions", json={"model": model, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


# ---- the fuzz cases

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
WEIRD = [
    None, True, False, 0, -1, 1, 3, 7, -7, 2**31, 2**63, -(2**63) - 1, 10**30, 0.5, -0.5, 1e308, -1e308, 5e-324,
    "", "x", "9", "null", "\U0001f642" * 3, "\x00\x01", "a" * 20000, [], [1], [-1], ["a"], [[]], [None], {}, {"a": 1},
    {"type": "text"}, [{"role": "user"}],
]  # fmt: skip
# max_tokens (and max_completion_tokens) only get values that are wrong or small: a valid
# large or null one would decode up to max_model_len tokens and make the fuzz slow, not harder
BAD_MAX_TOKENS = [0, -1, -(2**63), 2**63, 10**30, 10**9, MAX_MODEL_LEN + 1, 1.5, "x", "", [], {}, False, 1e308]
FIELDS = [
    "model", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop", "stream", "stream_options", "logit_bias",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "user", "stop_token_ids", "allowed_token_ids",
    "bad_words", "min_tokens", "ignore_eos", "response_format", "structured_outputs", "truncate_prompt_tokens",
    "priority", "prompt_logprobs", "logprobs", "skip_special_tokens", "include_stop_str_in_output", "request_id",
    "cache_salt", "vllm_xargs", "echo", "best_of",
]  # fmt: skip
CHAT_FIELDS = FIELDS + ["messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
                        "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "documents"]  # fmt: skip
CMPL_FIELDS = FIELDS + ["prompt", "suffix"]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
MESSAGE_VARIANTS = [
    [{"role": "wizard", "content": "hi"}],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"content": "no role"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}],
    [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}],
    [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}]}],
    [{"role": "user", "content": [{"type": "file", "file": {"file_data": "AAAA"}}]}],
    [{"role": "user", "content": [{"type": "nonsense"}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "tool", "content": "42"}],
    [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}],
    [{"role": "system", "content": "only a system message"}],
    [{"role": "user", "content": "hi"}] * 3000,
    [{"role": "user", "content": "hello " * 3000}],
    [],
    {"role": "user", "content": "not a list"},
    "hi",
]
PROMPT_VARIANTS = [
    "", [], [[]], [10**9], [-1], [49152], [0], [1.5], ["a"] * 2000, [[1, 2], ["x"]], "hello " * 3000,
    list(range(5000)), "x" * (1 << 20), {"a": 1}, [None],
]  # fmt: skip
BIG_LISTS = {
    "stop": ["stop%d" % i for i in range(5000)],
    "stop_token_ids": list(range(5000)),
    "bad_words": ["w%d" % i for i in range(5000)],
    "logit_bias": {str(i): 1 for i in range(5000)},
    "allowed_token_ids": list(range(49152, 54152)),
}
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-0", "01", "1_000", "0x10", "1e-999"]
NUMERIC_FIELDS = ["temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "max_tokens", "seed", "n"]


def fuzz_cases(seed: int, count: int, model: str) -> list[tuple[str, bytes, str]]:
    """``count`` (path, body bytes, what) cases: half to each endpoint, each a valid small request
    with one or two things broken."""
    rng = random.Random(seed)
    cases = []

    def base(path):
        body = {"model": model, "max_tokens": 2, "temperature": 0}
        if path == CHAT:
            body["messages"] = [{"role": "user", "content": "Say hi"}]
        else:
            body["prompt"] = "Hello"
        return body

    def mutate(path, body):
        fields = CHAT_FIELDS if path == CHAT else CMPL_FIELDS
        kind = rng.choice(["field", "field", "field", "missing", "unknown", "messages_or_prompt", "big", "tools", "logprobs", "max_tokens"])
        if kind == "field":
            f = rng.choice(fields)
            body[f] = rng.choice(WEIRD)
            return f"{f}={json.dumps(body[f])[:30]}"
        if kind == "missing":
            f = rng.choice([k for k in body if k != "max_tokens"])
            del body[f]
            return f"no {f}"
        if kind == "unknown":
            f = rng.choice(["foo", "__proto__", "functions", "function_call", "logit_bias_typo", "max_token", "x" * 200])
            body[f] = rng.choice(WEIRD)
            return f"unknown {f[:20]}"
        if kind == "messages_or_prompt":
            if path == CHAT:
                body["messages"] = rng.choice(MESSAGE_VARIANTS)
                return f"messages={json.dumps(body['messages'])[:40]}"
            body["prompt"] = rng.choice(PROMPT_VARIANTS)
            return f"prompt={json.dumps(body['prompt'])[:40]}"
        if kind == "big":
            f = rng.choice(list(BIG_LISTS))
            body[f] = BIG_LISTS[f]
            return f"{f} x{len(BIG_LISTS[f])}"
        if kind == "tools":
            body["tools"] = rng.choice([[TOOL], [TOOL] * 200, [{"type": "function"}], [{"type": "retrieval"}], "x"])
            body["tool_choice"] = rng.choice(["auto", "required", "none", "bogus", {"type": "function", "function": {"name": "nope"}}, None])
            if rng.random() < 0.5:
                body["response_format"] = rng.choice([
                    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
                    {"type": "json_schema"}, {"type": "grammar", "grammar": "("}, {"type": "structural_tag"}, {"type": "xml"},
                ])  # fmt: skip
            return f"tools/{json.dumps(body.get('tool_choice'))}/{json.dumps(body.get('response_format'))[:30]}"
        if kind == "logprobs":
            if path == CHAT:
                body["logprobs"] = rng.choice([True, False, None, 5])
                body["top_logprobs"] = rng.choice([-1, 0, 5, 21, 10**9, "x", None])
            else:
                body["logprobs"] = rng.choice([-1, 0, 5, 21, 10**9, True, "x"])
                body["echo"] = rng.choice([True, False])
            return f"logprobs={body['logprobs']} top={body.get('top_logprobs', body.get('echo'))}"
        key = "max_completion_tokens" if path == CHAT and rng.random() < 0.3 else "max_tokens"
        body[key] = rng.choice(BAD_MAX_TOKENS)
        return f"{key}={body[key]}"

    def raw(path, body) -> tuple[bytes, str]:
        text = json.dumps(body)
        kind = rng.choice(["truncated", "garbage", "utf8", "deep", "number", "nonobject", "empty"])
        if kind == "truncated":
            return text[: rng.randrange(len(text))].encode(), "truncated JSON"
        if kind == "garbage":
            return (text + rng.choice(["}", ",", " x", "\x00", "]]"])).encode(), "trailing garbage"
        if kind == "utf8":
            raw_bytes = text.encode()
            i = raw_bytes.index(b'"', raw_bytes.index(b'"model"') + 8) + 1
            return raw_bytes[:i] + rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) + raw_bytes[i:], "invalid UTF-8"
        if kind == "deep":
            depth = rng.choice([64, 1000, 100000])
            key = "messages" if path == CHAT else "prompt"
            return f'{{"model": "{model}", "max_tokens": 2, "{key}": {"[" * depth}1{"]" * depth}}}'.encode(), f"nested {depth}"
        if kind == "number":
            f = rng.choice(NUMERIC_FIELDS)
            return text[:-1].encode() + f', "{f}": {rng.choice(RAW_NUMBERS)}}}'.encode(), f"{f} raw number"
        if kind == "nonobject":
            return json.dumps(rng.choice(WEIRD)).encode(), "not an object"
        return b"", "empty body"

    for i in range(count):
        path = CHAT if i % 2 == 0 else CMPL
        body = base(path)
        if rng.random() < 0.2:
            content, what = raw(path, body)
        else:
            what = " & ".join(mutate(path, body) for _ in range(rng.choice([1, 1, 2])))
            if rng.random() < 0.25:
                body["stream"] = True
            content = json.dumps(body).encode()
        cases.append((path, content, what))
    return cases


FUZZ_SEED, FUZZ_COUNT = 12, 320


@pytest_slow
def test_fuzz_one_keepalive_connection(server, model):
    cases = fuzz_cases(FUZZ_SEED, FUZZ_COUNT, model)
    log_path = Path(server.log.name)
    log_start = log_path.stat().st_size
    statuses, failures, ports = Counter(), [], set()
    started = time.time()
    with httpx.Client(base_url=server.base, headers=AUTH, timeout=httpx.Timeout(60)) as http:
        before = greedy_answer(http, model)
        for path, content, what in cases:
            try:
                r = http.post(path, content=content, headers={"content-type": "application/json"})
            except httpx.HTTPError as e:  # a reset connection, a hang (the timeout), ...
                failures.append(f"{path} {what}: {e!r}")
                continue
            ports.add(local_port(r))
            statuses[r.status_code] += 1
            if r.status_code >= 500:
                failures.append(f"{path} {what}: {r.status_code} {r.text[:200]}")
            elif r.status_code >= 400:
                try:
                    err = r.json()["error"]
                    assert set(err) == ERROR_KEYS and err["message"] and err["type"] == "invalid_request_error"
                except Exception:
                    failures.append(f"{path} {what}: {r.status_code} without an OpenAI error body: {r.text[:200]}")
        after = greedy_answer(http, model)
    took = time.time() - started
    print(f"fuzz: {len(cases)} requests in {took:.0f} s, statuses {dict(sorted(statuses.items()))}, "
          f"{len(failures)} failures, {len(ports)} connection(s)")  # fmt: skip
    assert failures == []
    assert sum(statuses.values()) == FUZZ_COUNT >= 300
    assert len(ports) == 1  # every request, 4xx or not, on the one keep-alive connection
    assert before == after
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) >= FUZZ_COUNT // 2  # it did probe errors
    log = log_path.read_text()[log_start:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert not re.search(r"^(\(\w+ pid=\d+\) )?ERROR", log, re.M), log[-3000:]
    warned = re.findall(r"^WARNING .* \[http\] .* (4\d\d) in ", log, re.M)
    assert len(warned) == sum(n for s, n in statuses.items() if 400 <= s < 500)  # one line per 4xx


SOAK_STREAMS, SOAK_ROUNDS = 64, 3
SOAK_STATE = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_preemptions_total",
              "vllm:kv_cache_usage_perc", "mod_free_kv_blocks", "vllm:generation_tokens_total")  # fmt: skip


SOAK_DROP_TOKENS = MAX_MODEL_LEN - 64  # (prompts, the chat template's included, are < 64 tokens)


async def soak_stream(http: httpx.AsyncClient, model: str, i: int) -> tuple[int, bool, list[str], int]:
    """Stream ``i``: chat or completion; every fourth is dropped after three events (it asked for
    SOAK_DROP_TOKENS tokens, to the end of the context: ~10 s of decode at the soak's batch here,
    so it has not finished unless this client fell that far behind), the others read to the end
    (8 tokens). Also the client's port, which names the stream in the server's access log."""
    drop = i % 4 == 0
    body = {"model": model, "max_tokens": SOAK_DROP_TOKENS if drop else 8, "stream": True, "ignore_eos": drop}
    if i % 2:
        path, body["prompt"] = CMPL, f"Fact number {i}:"
    else:
        path, body["messages"] = CHAT, [{"role": "user", "content": f"Say a number close to {i}."}]
    events = []
    async with http.stream("POST", path, json=body) as r:
        port = r.extensions["network_stream"].get_extra_info("client_addr")[1]
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                if drop and len(events) == 3:
                    break  # leaving the block closes the connection mid-stream
    return r.status_code, drop, events, port


def round_log(log_path: Path, start: int) -> list[str]:
    """The access log's request lines written since offset ``start``."""
    return re.findall(r'^.*"POST /v1/\S+" (?:aborted|\d{3}) .*$', log_path.read_text()[start:], re.M)


@pytest_slow
def test_soak_streams_dropped_midstream_leak_nothing(server, model):
    """Three rounds of 64 concurrent streams, every fourth dropped by its client after three
    events: every stream answers 200, all KV blocks come back, and every drop the server saw
    counts once as a client_disconnect abort. A dropped stream is named by its client port in
    the access log: there it is "aborted (client disconnect)", or 200 if the server had sent it
    to its end before this client read its third event (a client far behind, as seen once in CI;
    then there was nothing to abort). Most drops must still be real aborts."""
    before = metrics(server.base)

    async def one_round():
        limits = httpx.Limits(max_connections=SOAK_STREAMS)
        async with httpx.AsyncClient(base_url=server.base, headers=AUTH, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(soak_stream(http, model, i) for i in range(SOAK_STREAMS)))

    def aborted(m):
        return counter(m, "mod_serve_requests_aborted_total", "reason", "client_disconnect")

    log_path = Path(server.log.name)
    want = aborted(before)
    dropped_total = 0
    for n in range(SOAK_ROUNDS):
        log_start = log_path.stat().st_size
        started = time.time()
        try:
            results = asyncio.run(one_round())
        except httpx.TimeoutException as e:  # a stream silent for 120 s: say what the engine was doing
            m = metrics(server.base)
            state = {k: v for k, v in m.items() if k.split("{")[0] in SOAK_STATE}
            lines = round_log(log_path, log_start)
            pytest.fail(f"round {n + 1}: {e!r} after {time.time() - started:.0f} s; engine {state}; "
                        f"the round's access log:\n" + "\n".join(lines[-80:]))  # fmt: skip
        took = time.time() - started
        assert [status for status, _, _, _ in results] == [200] * SOAK_STREAMS
        dropped = [events for _, drop, events, _ in results if drop]
        finished = [events for _, drop, events, _ in results if not drop]
        assert len(dropped) == SOAK_STREAMS // 4 and all(len(e) == 3 for e in dropped)
        for events in finished:
            assert events[-1] == "[DONE]" and "error" not in json.loads(events[-2])
            assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "stop")
        m = wait_idle(server.base, timeout=30)
        print(f"soak round {n + 1}: {SOAK_STREAMS} streams in {took:.1f} s; free/total blocks "
              f"{m.get('mod_free_kv_blocks')}/{m.get('mod_total_kv_blocks')}, running {m['vllm:num_requests_running']}")  # fmt: skip
        assert_all_blocks_back(m)
        # each dropped stream's outcome, once its exchange has ended (the engine can be idle a
        # moment before the HTTP side has accounted and logged the last abort)
        ports = [port for _, drop, _, port in results if drop]
        assert len(set(ports)) == len(ports)  # one connection each: the port names the stream
        deadline = time.time() + 30
        while len(outcomes := access_outcomes(log_path.read_text()[log_start:], ports)) < len(ports):
            assert time.time() < deadline, f"round {n + 1}: no access-log line for ports {set(ports) - set(outcomes)}"
            time.sleep(0.2)
        assert set(outcomes.values()) <= {"aborted (client disconnect)", "200"}, outcomes
        drops = sum(o.startswith("aborted") for o in outcomes.values())
        dropped_total += drops
        want += drops
        got = aborted(wait_metrics(server.base, lambda m: aborted(m) >= want, max(0.0, deadline - time.time())))
        if got != want:
            lines = round_log(log_path, log_start)
            pytest.fail(f"round {n + 1}: {got - want:+.0f} client_disconnect aborts against the {drops} dropped "
                        f"streams the server aborted; the round's access log:\n" + "\n".join(lines))  # fmt: skip
        if drops < len(ports):
            print(f"soak round {n + 1}: {len(ports) - drops} dropped stream(s) had ended before their drop")
    assert dropped_total >= SOAK_ROUNDS * SOAK_STREAMS // 8  # most drops were real aborts
    after = metrics(server.base)
    delta = {k: after[k] - before.get(k, 0) for k in after if k.startswith("mod_serve_")}
    assert counter(delta, "mod_serve_http_responses_total", "status_class", "2xx") >= SOAK_ROUNDS * SOAK_STREAMS
    assert counter(delta, "mod_serve_http_responses_total", "status_class", "4xx") == 0
    assert counter(delta, "mod_serve_http_responses_total", "status_class", "5xx") == 0


KVX_REQUESTS, KVX_PROMPT, KVX_TOKENS = 6, 64, 72


@pytest_slow
def test_kv_exhaustion_preempts_and_every_request_matches_an_unloaded_run(server, model, tokenizer):
    """Six requests of 64 prompt tokens growing to 136, against a pool that holds ~465 tokens
    per layer: the scheduler admits requests while their prompts fit, and they cannot all grow
    to their end (blocks of 32 tokens, measured: two per layer each at admission, five at the
    end; the same with blocks of 128: one, then two past 128 tokens), so it has to preempt
    running ones. Every request must still complete, equal to the same request run alone
    (float32), with no 5xx."""
    text = (
        "The history of the city goes back many centuries. Merchants came from distant lands to trade "
        "spices, silk and silver, and the harbour grew into one of the busiest on the coast. "
    ) * 3
    ids = tokenizer(text)["input_ids"]
    prompts = [(tokenizer(f"Chapter {i}.")["input_ids"] + ids[3 * i :])[:KVX_PROMPT] for i in range(KVX_REQUESTS)]
    assert all(len(p) == KVX_PROMPT for p in prompts)

    def body(p):
        return {"model": model, "prompt": p, "max_tokens": KVX_TOKENS, "temperature": 0, "ignore_eos": True}

    with httpx.Client(base_url=server.base, headers=AUTH, timeout=300) as http:
        alone = [http.post(CMPL, json=body(p)).json()["choices"][0]["text"] for p in prompts]
    before = metrics(server.base)

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.base, headers=AUTH, timeout=300) as http:
            return await asyncio.gather(*(http.post(CMPL, json=body(p)) for p in prompts))

    responses = asyncio.run(all_at_once())
    after = wait_idle(server.base, timeout=30)
    assert [r.status_code for r in responses] == [200] * KVX_REQUESTS, [r.text[:200] for r in responses]
    preempted = after["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"]
    print(f"KV exhaustion: {KVX_REQUESTS} requests, {preempted:.0f} preemptions")
    assert preempted > 0  # the pool really ran out
    together = [r.json()["choices"][0]["text"] for r in responses]
    assert [r.json()["usage"]["completion_tokens"] for r in responses] == [KVX_TOKENS] * KVX_REQUESTS
    assert together == alone
    assert_all_blocks_back(after)
    assert counter(after, "mod_serve_http_responses_total", "status_class", "5xx") == 0
