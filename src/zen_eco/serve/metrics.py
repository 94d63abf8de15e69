"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own (not the process-wide
default one), so several apps in one process (tests) keep separate counts.

| metric | type | what |
|---|---|---|
| zen_eco_requests_total{route,status} | counter | HTTP requests answered, by route template and status |
| zen_eco_prompt_tokens_total | counter | prompt tokens of requests that started generating |
| zen_eco_prompt_tokens_cached_total | counter | of those, tokens served from a reused KV-cache prefix |
| zen_eco_generation_tokens_total | counter | tokens generated (cancelled requests' included) |
| zen_eco_requests_cancelled_total | counter | requests stopped before the end (client gone, error) |
| zen_eco_queue_depth | gauge | requests waiting for a batch slot |
| zen_eco_active_sequences | gauge | requests in the running batch |
| zen_eco_kv_slots_busy / zen_eco_kv_slots_total | gauge | KV caches in use / in the pool (= --max-batch) |
| zen_eco_time_to_first_token_seconds | histogram | submit (queue wait included) to first token |
| zen_eco_inter_token_latency_seconds | histogram | time between a request's consecutive tokens |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from ..engine.scheduler import Scheduler

CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, scheduler: "Scheduler") -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("zen_eco_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("zen_eco_prompt_tokens", "Prompt tokens of started requests", registry=r)
        self.cached_prompt_tokens = Counter("zen_eco_prompt_tokens_cached",
                                            "Prompt tokens served from a reused KV-cache prefix", registry=r)
        self.generation_tokens = Counter("zen_eco_generation_tokens", "Generated tokens", registry=r)
        self.cancelled = Counter("zen_eco_requests_cancelled", "Requests stopped before their end", registry=r)
        Gauge("zen_eco_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(
            lambda: scheduler.queue_depth)
        Gauge("zen_eco_active_sequences", "Requests in the running batch", registry=r).set_function(
            lambda: scheduler.active)
        Gauge("zen_eco_kv_slots_busy", "KV caches in use", registry=r).set_function(lambda: scheduler.pool.busy)
        Gauge("zen_eco_kv_slots_total", "KV caches in the pool", registry=r).set_function(lambda: scheduler.pool.size)
        self.ttft = Histogram("zen_eco_time_to_first_token_seconds", "Submit to first token (queue wait included)",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("zen_eco_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
