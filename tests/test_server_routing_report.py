"""The HTTP side of the per-request threshold and routing report, without an engine."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from server.routing_report import RoutingReport, move_threshold

MOD = {"threshold": 0.6, "routed_fraction": {"3": 0.5, "4": 0.25}, "kv_bytes": 10, "dense_kv_bytes": 20}


def request(**extra):
    return SimpleNamespace(model_extra=dict(extra), vllm_xargs=None)


def test_top_level_threshold_goes_to_the_engine():
    r = request(mod_threshold=0.6)
    move_threshold(r, is_mod=True)
    assert r.vllm_xargs == {"mod_threshold": 0.6} and "mod_threshold" not in r.model_extra
    r = request()
    move_threshold(r, is_mod=True)
    assert r.vllm_xargs is None


@pytest.mark.parametrize("bad", [-0.1, 1.01, "0.6", True, None, float("nan")])
def test_bad_threshold_names_the_field(bad):
    with pytest.raises(ValueError, match="mod_threshold must be a number in"):
        move_threshold(request(mod_threshold=bad), is_mod=True)


def test_threshold_on_a_dense_model_is_refused():
    with pytest.raises(ValueError, match="mod_threshold: this model is not a Mixture-of-Depths"):
        move_threshold(request(mod_threshold=0.5), is_mod=False)


def report():
    engine = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(model_type="mod_llama")))

    async def generate(*a, **k):
        yield None

    engine.generate = generate
    return RoutingReport(engine)


def test_figures_move_into_usage_and_merge_over_sub_requests():
    rep = report()
    rep._keep("cmpl-1-0", MOD)
    rep._keep("cmpl-1-1", {**MOD, "routed_fraction": {"3": 1.0, "4": 0.75}})
    body = rep.attach({"id": "cmpl-1", "usage": {"prompt_tokens": 3}, "kv_transfer_params": {"mod": MOD}})
    assert body["kv_transfer_params"] is None
    assert body["usage"]["mod"] == {"threshold": 0.6, "routed_fraction": {"3": 0.75, "4": 0.5}, "kv_bytes": 20,
                                    "dense_kv_bytes": 40}
    assert not rep.figures  # taken once
    rep._keep("chatcmpl-2", MOD)
    content = 'data: {"id": "chatcmpl-2", "choices": [{"delta": {}}], "usage": null}\n\n'
    assert rep.attach_chunk(content) == content  # not the usage chunk
    final = json.loads(rep.attach_chunk('data: {"id": "chatcmpl-2", "choices": [], "usage": {"total_tokens": 5}}\n\n')[6:])
    assert final["usage"]["mod"] == MOD
    assert b"mod_request_routed_fraction_count 3.0" in rep.render()
