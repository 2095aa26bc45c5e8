# -*- test-case-name: tests.unit.test_admin -*-
"""
Every metric bioproxy exports, on one CollectorRegistry per service so that
two services in one process (or two tests) never share counters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.web.server import Request

from .errors import JSONResource
from .routes import ROUTES

# A `_created` series per counter and histogram doubles /metrics for a
# timestamp Prometheus does not use.
disable_created_metrics()

# llama-server's routes; anything else is counted as "other" so a client
# cannot blow up the label cardinality with made-up paths.
KNOWN_PATHS = frozenset(path.decode("ascii") for path in ROUTES)
_SLOT_PATH = re.compile(r"^/slots/\d+$")

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


# The methods HTTP defines; any other is counted as "other", so that made-up
# methods cannot add a series each.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def methodLabel(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def pathLabel(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    if _SLOT_PATH.match(path):
        return "/slots/{id}"
    return "other"


class Metrics:
    """The service's metrics; pieces get this object passed in."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bioproxy_requests",
            "Requests answered, by route, method, status and template prefix.",
            ["path", "method", "status", "prefix"],
            registry=r,
        )
        self.duration = Histogram(
            "bioproxy_request_duration_seconds",
            "Time from request received to response end.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "bioproxy_time_to_first_byte_seconds",
            "Time from request received to the first response body byte sent to the client.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inFlight = Gauge(
            "bioproxy_requests_in_flight",
            "Requests being proxied right now.",
            registry=r,
        )
        self.backendErrors = Counter(
            "bioproxy_backend_errors",
            "Failed exchanges with a backend, by backend and kind (connect, timeout, midstream, idle).",
            ["backend", "kind"],
            registry=r,
        )
        self.backendUp = Gauge(
            "bioproxy_backend_up",
            "1 when the last health check of the backend succeeded.",
            ["backend"],
            registry=r,
        )
        self.templateErrors = Counter(
            "bioproxy_template_errors",
            "Template loads that failed, by prefix and kind; the last good version stays in use.",
            ["prefix", "kind"],
            registry=r,
        )
        self.templateSize = Gauge(
            "bioproxy_template_size_bytes",
            "Size of each template rendered with an empty message.",
            ["prefix"],
            registry=r,
        )
        self.queueWait = Histogram(
            "bioproxy_queue_wait_seconds",
            "Time from asking for a slot to getting one, by priority.",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slotGauges = _SlotGauges()
        r.register(self.slotGauges)
        # The next four keep the original's names.
        self.warmups = Counter(
            "bioproxy_warmup",
            "Warmups finished, by prefix and how (restore, prefill, resident).",
            ["prefix", "how"],
            registry=r,
        )
        self.warmupCancellations = Counter(
            "bioproxy_warmup_cancellations",
            "Warmups cancelled because a user request needed their slot.",
            ["prefix"],
            registry=r,
        )
        self.warmupFailures = Counter(
            "bioproxy_warmup_failures",
            "Warmups that failed, by prefix and kind (refused, unauthorized, error).",
            ["prefix", "kind"],
            registry=r,
        )
        self.kvSaves = Counter(
            "bioproxy_kv_cache_saves",
            "Slot saves to disk, by prefix.",
            ["prefix"],
            registry=r,
        )
        self.kvRestores = Counter(
            "bioproxy_kv_cache_restores",
            "Slot restores from disk, by prefix and status (ok, missing, empty, error).",
            ["prefix", "status"],
            registry=r,
        )
        self.promptTokens = Counter(
            "bioproxy_prompt_tokens",
            "Prompt tokens the backend reused from cache or computed, from its timings.",
            ["prefix", "kind"],
            registry=r,
        )
        self.warmupDuration = Histogram(
            "bioproxy_warmup_duration_seconds",
            "Time a warmup held its slot, by how it warmed.",
            ["how"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cacheMisses = Counter(
            "bioproxy_cache_misses",
            "Users' requests whose head (a template's, a learned one, a conversation) was not reused, by why (bioproxy.why).",
            ["prefix", "reason"],
            registry=r,
        )
        self.backendRestarts = Counter(
            "bioproxy_backend_restarts",
            "Times the backend came back after being unreachable, or changed model or build.",
            ["backend"],
            registry=r,
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def reportSlots(self, backend: str, source: Callable[[], SlotCounts]) -> None:
        """A backend's scheduler, whose queues and slots the two gauges read when scraped."""
        self.slotGauges.sources[backend] = source

    def child(self, metric: Any, *values: str) -> Any:
        """metric.labels(*values), looked up once: on every request it is a measurable cost."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def requestEnded(self, path: str, method: str, status: str, prefix: str, seconds: float) -> None:
        self.child(self.requests, path, method, status, prefix).inc()
        self.child(self.duration, path).observe(seconds)


SlotCounts = tuple[dict[str, int], dict[str, int]]  # waiting by priority, slots by state


class _SlotGauges:
    """
    bioproxy_queue_depth and bioproxy_slots, read from the scheduler when
    scraped: setting them on every dispatch was a dozen label lookups per
    request.
    """

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], SlotCounts]] = {}  # by backend URL

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families({}))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return self._families({backend: source() for backend, source in self.sources.items()})

    def _families(self, counts: dict[str, SlotCounts]) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily(
            "bioproxy_queue_depth",
            "Requests waiting for a slot, by backend and priority (user, warmup).",
            labels=["backend", "priority"],
        )
        slots = GaugeMetricFamily(
            "bioproxy_slots",
            "Backend slots by what bioproxy knows of them (busy, template, other, empty, unknown).",
            labels=["backend", "state"],
        )
        for backend, (waiting, states) in counts.items():
            for priority, n in waiting.items():
                queue.add_metric([backend, priority], n)
            for state, n in states.items():
                slots.add_metric([backend, state], n)
        yield queue
        yield slots


class MetricsResource(JSONResource):
    """Prometheus text exposition, rendered in-line: it is cheap and needs no thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        # OpenMetrics for a scraper that asks for it, Prometheus text otherwise.
        encode, contentType = choose_encoder((request.getHeader(b"accept") or b"").decode("latin-1"))
        request.setHeader(b"content-type", contentType.encode("ascii"))
        body: bytes = encode(self.registry)
        return body
