"""``/metrics``: vLLM's own Prometheus metrics, the MoD gauges, then the HTTP counters.

The MoD figures live in the engine's worker process (the plugin's KV manager), so they are
fetched per scrape with ``collective_rpc("mod_kv_stats")`` and written to a fresh registry
(no stale label sets). A dense model, or a plugin without that method, just has no MoD gauges.

The HTTP counters (``HttpCounters``) live in the app's own registry: responses by status class
(``mod_serve_http_responses_total{status_class="2xx"}``) and requests aborted before their
response was complete, by reason (``mod_serve_requests_aborted_total{reason="client_disconnect"}``
or ``reason="shutdown"``, the drain timeout).
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from vllm.v1.metrics.prometheus import get_prometheus_registry

log = logging.getLogger(__name__)

BLOCK_GAUGES = {
    "routed_kv_blocks": "KV blocks held by routed (MoD) layers, summed over those layers",
    "dense_equivalent_kv_blocks": "KV blocks the routed layers would hold if every token were routed in",
    "free_kv_blocks": "free KV blocks in the pool",
    "total_kv_blocks": "total KV blocks in the pool",
}


async def mod_kv_stats(engine) -> dict | None:
    """Worker 0's MoD KV statistics, or None for a dense model or when the call fails."""
    if getattr(engine.model_config.hf_config, "model_type", None) != "mod_llama":
        return None  # don't make every scrape log a failed RPC in the worker
    try:
        stats = await asyncio.wait_for(engine.collective_rpc("mod_kv_stats"), 5)
    except Exception as e:  # plugin without the method, engine busy or dead
        log.debug("mod_kv_stats unavailable: %s", e)
        return None
    return {**stats[0], "ranks": stats} if stats else None


def mod_gauges(stats: dict) -> bytes:
    """Unlabelled gauges: TP rank 0 (what the scheduler accounts); with several ranks also each
    rank's own block counts (every rank trims its own block tables from the same routing)."""
    reg = CollectorRegistry()
    frac = Gauge("mod_routed_fraction", "fraction of tokens routed into each MoD layer", ["layer"], registry=reg)
    for layer, value in sorted(stats.get("routed_fraction", {}).items(), key=lambda kv: int(kv[0])):
        frac.labels(layer=str(layer)).set(value)
    for name, help_ in BLOCK_GAUGES.items():
        if name in stats:
            Gauge(f"mod_{name}", help_, registry=reg).set(stats[name])
    ranks = stats.get("ranks", [])
    if len(ranks) > 1:
        for name in ("routed_kv_blocks", "free_kv_blocks"):
            g = Gauge(f"mod_rank_{name}", f"per worker rank: {BLOCK_GAUGES[name]}", ["tp_rank", "pp_rank"], registry=reg)
            for r in ranks:
                if name in r:
                    g.labels(tp_rank=str(r.get("tp_rank", 0)), pp_rank=str(r.get("pp_rank", 0))).set(r[name])
    return generate_latest(reg)


STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
ABORT_REASONS = ("client_disconnect", "shutdown")


class HttpCounters:
    """Per-app counters (a registry of their own, so that two apps in one process don't clash)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self._responses = Counter(
            "mod_serve_http_responses",
            "HTTP responses sent, by status class",
            ["status_class"],
            registry=self.registry,
        )
        self._aborted = Counter(
            "mod_serve_requests_aborted",
            "requests aborted before their response was complete (engine request aborted too), by reason",
            ["reason"],
            registry=self.registry,
        )
        for c in STATUS_CLASSES:
            self._responses.labels(status_class=c)
        for r in ABORT_REASONS:
            self._aborted.labels(reason=r)

    def response(self, status: int) -> None:
        self._responses.labels(status_class=f"{min(max(status // 100, 1), 5)}xx").inc()

    def aborted(self, reason: str) -> None:
        self._aborted.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def render_metrics(engine, counters: HttpCounters | None = None) -> tuple[bytes, str]:
    body = generate_latest(get_prometheus_registry())
    stats = await mod_kv_stats(engine)
    if stats:
        body += mod_gauges(stats)
    if counters is not None:
        body += counters.render()
    return body, CONTENT_TYPE_LATEST
