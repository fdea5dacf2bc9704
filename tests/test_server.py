"""The OpenAI-compatible server, end to end: one real `mod-serve serve` process, the `openai` client.

Serves the default MoD model once the vLLM plugin (`model_registry.register`) exists, the dense
base checkpoint before that; the server must not care which. float32 so that batched and
one-by-one greedy decoding agree token for token (bf16 on CPU does not: 7 of 16 differed).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

KEY = "sk-test-mod-serve"


def plugin_available() -> bool:
    try:
        import model_registry
    except Exception:
        return False
    return callable(getattr(model_registry, "register", None))


def test_model_dir() -> Path:
    from mod_serve.default_model import prepare_base, prepare_default_model

    return prepare_default_model() if plugin_available() else prepare_base()


test_model_dir.__test__ = False  # a helper, not a test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mod-serve serve` in its own process group, so that teardown can never leave orphans."""

    def __init__(self, log_dir: Path, model: Path | None, *extra: str, api_key: str | None = KEY):
        self.log = open(log_dir / "server.log", "w+")  # pytest's tmp dir: kept for a failed run
        cmd = [sys.executable, "-m", "mod_serve.cli", "serve"]
        cmd += ["--model", str(model)] if model else []  # none: the default model
        cmd += ["--kv-cache-gib", "0.25", "--max-model-len", "2048", "--dtype", "float32", "--max-num-seqs", "32"]
        cmd += ["--api-key", api_key] if api_key else []
        self.cmd = [*cmd, *extra]
        self.launch()

    def launch(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # niced: on two cores the engine's busy processes must not starve this client, whose
        # tests watch streams and the engine's counts in real time
        self.proc = subprocess.Popen(
            ["nice", "-n", "5", *self.cmd, "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def log_tail(self, n: int = 4000) -> str:
        return Path(self.log.name).read_text()[-n:]

    def wait_ready(self, timeout: float = 300, tries: int = 3) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                # free_port's port was taken before the server bound it (the server binds first
                # thing, but another process can get the port in between): another port
                if tries > 1 and "cannot bind" in self.log_tail(400):
                    tries -= 1
                    self.launch()
                    continue
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.kill()
        pytest.fail(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def group_pids(self) -> list[int]:
        """Live processes of the server's process group (the engine core and workers included)."""
        import psutil

        pids = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    pids.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        return pids

    def wait_no_process(self, timeout: float = 10) -> list[str]:
        """Processes of the group still alive after ``timeout`` s (described), else []."""
        import psutil

        deadline = time.time() + timeout
        while (pids := self.group_pids()) and time.time() < deadline:
            time.sleep(0.1)
        out = []
        for pid in pids:
            try:
                out.append(f"{pid} {psutil.Process(pid).name()} {psutil.Process(pid).status()}")
            except psutil.Error:
                pass
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:
                self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.log.close()


def metrics(base: str) -> dict[str, float]:
    """Prometheus samples as {"name{label=value}": value}; unlabelled samples under their name."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("engine", "model_name"))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def access_outcomes(log: str, ports: list[int]) -> dict[int, str]:
    """The access log's outcome for each client port that has a line: "aborted (client
    disconnect)", "200" and so on."""
    out = {}
    for port, outcome in re.findall(r'^.*\[http\] 127\.0\.0\.1:(\d+) "POST /v1/\S+" (aborted \([^)]*\)|\d{3}) .*$', log, re.M):
        if int(port) in ports:
            out[int(port)] = outcome
    return out


def wait_metrics(base: str, done, timeout: float) -> dict[str, float]:
    """Metrics once ``done(metrics)`` holds, or the last ones read at ``timeout`` (the caller asserts)."""
    deadline = time.time() + timeout
    while not done(m := metrics(base)) and time.time() < deadline:
        time.sleep(0.1)
    return m


def wait_idle(base: str, timeout: float = 10) -> dict[str, float]:
    """Metrics once no request runs or waits and the KV pool is back to full (or at ``timeout``)."""

    def idle(m):
        mod_full = m.get("mod_free_kv_blocks", 0) == m.get("mod_total_kv_blocks", 0)
        quiet = m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
        return quiet and m["vllm:kv_cache_usage_perc"] == 0 and mod_full

    return wait_metrics(base, idle, timeout)


def assert_all_blocks_back(m: dict[str, float]) -> None:
    """Nothing runs or waits and every KV block is free (``wait_idle``'s metrics, asserted)."""
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0
    if "mod_total_kv_blocks" in m:  # the MoD plugin's own pool count: every layer's blocks
        assert m["mod_free_kv_blocks"] == m["mod_total_kv_blocks"] > 0, m
        assert m["mod_routed_kv_blocks"] == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("server"), test_model_dir())
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop(signal.SIGINT)  # Ctrl-C; SIGTERM is tested in test_server_cli.py
        left = srv.wait_no_process()
        srv.kill()  # whatever happened, nothing of ours outlives the module
        assert rc == 0, f"server exit status {rc} on SIGINT:\n{srv.log_tail()}"
        assert left == []  # no orphan engine process (vLLM workers exit a moment after their parent)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(test_model_dir())


MSGS = [{"role": "user", "content": "Name three primary colours."}]


def test_health_and_models(server, client):
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [test_model_dir().name]


def test_chat_usage_matches_tokenizer(client, model, tokenizer):
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=12, temperature=0, logprobs=True)
    choice = r.choices[0]
    prompt_ids = tokenizer.apply_chat_template(MSGS, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(choice.logprobs.content) >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")


def test_completion_length_and_usage(client, model, tokenizer):
    prompt = "The three primary colours are"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    # an answer that ends by itself: EOS -> "stop", fewer tokens than allowed
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=200, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 200


def test_n_choices_and_seed(client, model):
    kw = dict(model=model, messages=MSGS, max_tokens=10, temperature=1.0, n=3, seed=1234, logprobs=True)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # same seed
    c = client.chat.completions.create(**{**kw, "seed": 99})
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]


def test_stop_strings(client, model):
    kw = dict(model=model, prompt="List the days of the week: Monday,", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    r = client.completions.create(**kw, stop=[stop, "never-appears-xyz"])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model=model, messages=MSGS, max_tokens=40, temperature=0, stop=["ed"])
    assert "ed" not in s.choices[0].message.content


def test_logprobs_consistent(client, model):
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=10, temperature=0, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 4 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    c = client.completions.create(model=model, prompt="Paris is the capital of", max_tokens=6, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.tokens) == c.usage.completion_tokens
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(v, abs=1e-5) for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_stream_equals_non_stream(server, client, model):
    kw = dict(model=model, messages=MSGS, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    # the same usage (MoD: the same routing report too), but for the prefix-cache hit the second
    # request got from the first (prefix caching is on by default)
    streamed, first = chunks[-1].usage.model_dump(), whole.usage.model_dump()
    assert chunks[-1].choices == [] and streamed.pop("prompt_tokens_details") is not None
    first.pop("prompt_tokens_details")
    assert streamed == first
    # the raw SSE stream ends with [DONE]; completions stream too
    body = {"model": model, "prompt": "Hello", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_concurrent_streams_match_sequential_and_free_kv(server, client, model):
    prompts = [f"Tell me one fact about the number {i}." for i in range(16)]
    kw = dict(model=model, max_tokens=16, temperature=0)
    one_by_one = [
        client.chat.completions.create(messages=[{"role": "user", "content": p}], **kw).choices[0].message.content
        for p in prompts
    ]

    async def stream(ac, p):
        s = await ac.chat.completions.create(messages=[{"role": "user", "content": p}], stream=True, **kw)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, timeout=300, max_retries=0) as ac:
            return await asyncio.gather(*(stream(ac, p) for p in prompts))

    started = time.time()
    together = asyncio.run(all_at_once())
    print(f"16 concurrent streams x 16 tokens: {time.time() - started:.1f} s")
    assert together == one_by_one
    assert len(set(together)) == 16  # independent outputs, not one answer copied around
    assert_all_blocks_back(wait_idle(server.base))


def test_client_disconnect_aborts_and_frees_blocks(server, model):
    before = metrics(server.base)
    max_tokens = 2000
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            # Hold the line iterator until the block ends: an abandoned one, once the cyclic GC
            # collects it (at a moment that depends on the earlier tests), closes httpx's stream and
            # with it the connection, and the server rightly aborts the request early. The collect
            # makes that moment now, so a leak here fails every run.
            lines = r.iter_lines()
            events = [json.loads(line[6:]) for _, line in zip(range(80), lines) if line.startswith("data: {")]
            gc.collect()
            # (vLLM's gauges follow the engine a moment behind)
            during = wait_metrics(server.base, lambda m: m["vllm:num_requests_running"] == 1, timeout=10)
            assert during["vllm:num_requests_running"] == 1 and during["vllm:kv_cache_usage_perc"] > 0
        # leaving the block closes the connection mid-stream
    # tokens received: a slow reader gets several tokens in one event (vLLM merges a stream's
    # pending outputs), so count them from the usage each event carries, not the events
    received = events[-1]["usage"]["completion_tokens"]
    closed = time.time()
    m = wait_idle(server.base, timeout=30)  # (< 1 s here; a stalled CI box needs more)
    print(f"disconnect -> idle in {time.time() - closed:.2f} s")
    assert_all_blocks_back(m)
    generated = m["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    time.sleep(1)
    assert metrics(server.base)["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == generated
    # Aborted (not ended at max_tokens) and counted once as a client disconnect; the HTTP side
    # counts the abort a moment after the engine is idle. How many tokens the engine decodes
    # before the server sees the closed socket depends on the machine's load, so that is printed,
    # not bounded (a bound would be a timing).
    aborts, length = "mod_serve_requests_aborted_total{reason=client_disconnect}", "vllm:request_success_total{finished_reason=length}"
    m = wait_metrics(server.base, lambda m: m.get(aborts, 0) != before.get(aborts, 0), timeout=10)
    assert m.get(aborts, 0) - before.get(aborts, 0) == 1 and m.get(length, 0) == before.get(length, 0)
    assert len(events) >= 20 and received <= generated < max_tokens, (len(events), received, generated)
    print(f"disconnect: {received} tokens received in {len(events)} events, {generated - received} more decoded")


def test_metrics(server, client, model):
    client.chat.completions.create(model=model, messages=MSGS, max_tokens=4)
    m = metrics(server.base)
    assert m["vllm:request_success_total{finished_reason=length}"] >= 1
    assert "vllm:kv_cache_usage_perc" in m
    mod = {k: v for k, v in m.items() if k.startswith("mod_")}
    if not plugin_available():
        assert mod == {}  # dense model: no MoD gauges
        return
    fractions = {k: v for k, v in mod.items() if k.startswith("mod_routed_fraction{")}
    assert fractions and all(0 <= v <= 1 for v in fractions.values())
    assert sum(fractions.values()) > 0  # at the checkpoint's p some tokens are routed in
    assert 0 <= mod["mod_routed_kv_blocks"] <= mod["mod_dense_equivalent_kv_blocks"]
    assert 0 <= mod["mod_free_kv_blocks"] <= mod["mod_total_kv_blocks"]


# ---------------------------------------------------------------- errors


def post(server, path, body, key=KEY, raw=False):
    headers = {"content-type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = body if raw else json.dumps(body)
    return httpx.post(server.base + path, content=content, headers=headers, timeout=120)


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    return err


LONG = "hello " * 3000  # > 2048 tokens


TOO_LONG = "maximum context length is 2048"


@pytest.mark.parametrize(
    "path,body,param,says",
    [
        ("/v1/chat/completions", {"messages": MSGS, "temperature": -1}, "temperature", "temperature"),
        ("/v1/chat/completions", {"messages": MSGS, "top_p": 2}, "top_p", "top_p"),
        ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 0}, "max_tokens", "max_tokens"),
        ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 10**9}, "max_tokens", "max_model_len"),
        ("/v1/chat/completions", {"messages": MSGS, "n": 0}, None, "n must be"),
        ("/v1/chat/completions", {"messages": MSGS, "n": 100000}, "n", "n must be"),
        ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 50}, "logprobs", "logprobs"),
        ("/v1/chat/completions", {"messages": MSGS, "seed": "x"}, "seed", "integer"),
        ("/v1/chat/completions", {"messages": []}, None, "empty"),
        ("/v1/chat/completions", {}, "messages", "required"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, None, TOO_LONG),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "stream": True}, None, TOO_LONG),
        ("/v1/completions", {"prompt": LONG}, None, TOO_LONG),
        ("/v1/completions", {"prompt": LONG, "stream": True}, None, TOO_LONG),
        ("/v1/completions", {"prompt": [10**7]}, None, "vocabulary"),
        ("/v1/completions", {}, "prompt", "prompt"),
    ],
)
def test_bad_requests_are_400(server, model, path, body, param, says):
    err = assert_error(post(server, path, {"model": model, **body}), 400, param)
    assert says in err["message"]


@pytest.mark.parametrize("raw", ['{"model": ', "[1, 2]", "not json", ""])
def test_malformed_json_is_400(server, raw):
    assert_error(post(server, "/v1/chat/completions", raw, raw=True), 400)


def test_unknown_model_is_404(server, client):
    err = assert_error(post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": MSGS}), 404, "model")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_bad_api_key_is_401(server, model, key):
    for path, body in [("/v1/chat/completions", {"model": model, "messages": MSGS}), ("/v1/completions", {"prompt": "x"})]:
        err = assert_error(post(server, path, body, key=key), 401)
        assert err["code"] == "invalid_api_key"
    r = httpx.get(server.base + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    assert_error(r, 401)
    if key:  # the openai client refuses to send no key at all
        bad = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=model, messages=MSGS, max_tokens=2)


def test_server_survives_the_errors(server, client, model):
    """Runs last in this module: after every error above the server still answers."""
    assert httpx.get(server.base + "/health").status_code == 200
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=3)
    assert r.usage.completion_tokens >= 1
    assert_all_blocks_back(wait_idle(server.base))


# ---- per-request depth budget and routing report (issue 11) ----------------------------------
def test_request_threshold_and_usage_report(server, client, model):
    """``extra_body={"mod_threshold": p}`` routes that request at p; every response's usage says
    how it was routed and what KV it held, streamed (final usage chunk) or not."""
    if not plugin_available():
        pytest.skip("dense model: no routing report")
    reports = {}
    for p in (None, 0.3, 0.9):
        extra = {} if p is None else {"mod_threshold": p}
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                      temperature=0, extra_body=extra)
        mod = r.usage.model_extra["mod"]
        assert set(mod) == {"threshold", "routed_fraction", "kv_bytes", "dense_kv_bytes"}
        assert 0 < mod["kv_bytes"] <= mod["dense_kv_bytes"]
        assert all(0 < f <= 1 for f in mod["routed_fraction"].values())
        reports[p] = mod
    assert reports[None]["threshold"] == 0.5 and reports[0.3]["threshold"] == 0.3
    mean = {p: sum(m["routed_fraction"].values()) / len(m["routed_fraction"]) for p, m in reports.items()}
    assert mean[0.3] > mean[None] > mean[0.9]  # a higher p routes fewer tokens in
    assert reports[0.9]["kv_bytes"] <= reports[None]["kv_bytes"] <= reports[0.3]["kv_bytes"]
    # streamed: the same figures in the final usage chunk
    stream = client.chat.completions.create(model=model, messages=MSGS, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"mod_threshold": 0.3})
    last = list(stream)[-1]
    assert last.usage is not None and last.usage.model_extra["mod"]["threshold"] == 0.3
    h = metrics(server.base)
    assert h["mod_request_routed_fraction_count"] >= 4


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", True, [0.5]])
def test_bad_request_threshold_is_400(server, model, bad):
    if not plugin_available():
        pytest.skip("dense model")
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": MSGS})):
        err = assert_error(post(server, path, {"model": model, "max_tokens": 2, "mod_threshold": bad, **body}), 400,
                           "mod_threshold")
        assert "mod_threshold" in err["message"]


def test_prefix_cache_hits_reported_in_usage(client, model, tokenizer):
    """A prompt sent twice: the second answer reports the cached tokens vLLM's prefix cache gave it
    (MoD routed layers included), floor((len - 1) / 32) * 32, and the same text."""
    prompt = " ".join(f"fact {i}: the number {i} squared is {i * i}." for i in range(30))
    n = len(tokenizer(prompt).input_ids)
    first = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    second = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens == n
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 32 * 32 > 0
    assert second.choices[0].text == first.choices[0].text
