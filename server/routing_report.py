"""Per-request depth budget and routing report over HTTP (MoD checkpoints).

* Request: a top-level ``"mod_threshold": p`` in the body (``extra_body={"mod_threshold": 0.6}``
  with the openai client) becomes ``vllm_xargs["mod_threshold"]``, which vLLM hands to the engine
  as ``SamplingParams.extra_args``; the plugin rounds p to 0.01 and routes that request at it.
  Not a number in [0, 1], or sent to a dense model: 400 naming the field.
* Response: the engine puts each finished request's figures (``threshold``, ``routed_fraction``
  per layer, ``kv_bytes`` and ``dense_kv_bytes`` its routed layers held) on the final
  ``RequestOutput.kv_transfer_params["mod"]``. ``RoutingReport`` wraps the engine's ``generate`` to
  keep them per request id, moves them into ``usage["mod"]`` of a non-streamed response or of the
  final usage chunk of a stream (``stream_options.include_usage``), and observes each request's
  mean routed fraction in a histogram for ``/metrics``.
"""

from __future__ import annotations

import collections
import json

from prometheus_client import CollectorRegistry, Histogram, generate_latest

MAX_PENDING = 4096  # figures of requests whose response never asked for them are dropped oldest first


class RoutingReport:
    def __init__(self, engine):
        self.enabled = getattr(engine.model_config.hf_config, "model_type", None) == "mod_llama"
        self.figures: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.registry = CollectorRegistry()
        self.histogram = Histogram(
            "mod_request_routed_fraction",
            "per finished request: fraction of its tokens routed into the routed layers (mean over layers)",
            buckets=[i / 10 for i in range(1, 11)],
            registry=self.registry,
        )
        if self.enabled:
            self._wrap(engine)

    def _wrap(self, engine) -> None:
        generate = engine.generate

        async def generate_and_keep(*args, **kwargs):
            async for out in generate(*args, **kwargs):
                mod = (out.kv_transfer_params or {}).get("mod") if out.finished else None
                if mod is not None:
                    self._keep(out.request_id, mod)
                yield out

        engine.generate = generate_and_keep

    def _keep(self, request_id: str, mod: dict) -> None:
        self.figures[request_id] = mod
        while len(self.figures) > MAX_PENDING:
            self.figures.popitem(last=False)
        fractions = list(mod.get("routed_fraction", {}).values())
        if fractions:
            self.histogram.observe(sum(fractions) / len(fractions))

    def take(self, response_id: str) -> dict | None:
        """The figures of a response: its request's, or merged over its sub-requests (several
        prompts or ``n`` > 1 run as requests ``<id>-<i>`` / ``<id>_<i>``)."""
        parts = [k for k in self.figures if k == response_id or k.startswith((f"{response_id}-", f"{response_id}_"))]
        found = [self.figures.pop(k) for k in parts]
        if not found:
            return None
        if len(found) == 1:
            return found[0]
        layers = found[0].get("routed_fraction", {})
        return {
            "threshold": found[0].get("threshold"),
            "routed_fraction": {k: sum(f["routed_fraction"].get(k, 0.0) for f in found) / len(found) for k in layers},
            "kv_bytes": sum(f.get("kv_bytes", 0) for f in found),
            "dense_kv_bytes": sum(f.get("dense_kv_bytes", 0) for f in found),
        }

    # ---- responses -----------------------------------------------------------------------------
    def attach(self, body: dict) -> dict:
        """A non-streamed response body with ``usage["mod"]`` (and no ``kv_transfer_params``
        that only carried it)."""
        kv = body.get("kv_transfer_params")
        if isinstance(kv, dict) and "mod" in kv:
            kv.pop("mod")
            body["kv_transfer_params"] = kv or None
        mod = self.take(body.get("id", "")) if self.enabled else None
        if mod is not None and isinstance(body.get("usage"), dict):
            body["usage"]["mod"] = mod
        return body

    def attach_chunk(self, chunk: str) -> str:
        """The final usage chunk of a stream (``choices`` empty, ``usage`` set) with ``usage["mod"]``."""
        if not self.enabled or '"usage"' not in chunk or not chunk.startswith("data: {"):
            return chunk
        try:
            data = json.loads(chunk[len("data: ") :])
        except ValueError:
            return chunk
        if not isinstance(data.get("usage"), dict) or data.get("choices"):
            return chunk
        mod = self.take(data.get("id", ""))
        if mod is None:
            return chunk
        data["usage"]["mod"] = mod
        return f"data: {json.dumps(data)}\n\n"

    def render(self) -> bytes:
        return generate_latest(self.registry) if self.enabled else b""


def move_threshold(request, is_mod: bool) -> None:
    """A top-level ``mod_threshold`` (or ``vllm_xargs.mod_threshold``) checked and handed to the
    engine as ``vllm_xargs``; raises ``ValueError`` with a message naming the field."""
    extra = request.model_extra or {}
    xargs = dict(request.vllm_xargs or {})
    if "mod_threshold" not in extra and "mod_threshold" not in xargs:
        return
    p = extra.pop("mod_threshold", None) if "mod_threshold" in extra else xargs.get("mod_threshold")
    if not is_mod:
        raise ValueError("mod_threshold: this model is not a Mixture-of-Depths (MoD) model; remove the field")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"mod_threshold must be a number in [0, 1], got {p!r}")
    xargs["mod_threshold"] = float(p)
    request.vllm_xargs = xargs
