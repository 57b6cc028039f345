"""Prometheus metrics of one server (or one Ray Serve replica), in its own registry.

Requests by endpoint and outcome, prompt and completion tokens, decode steps, queue depth, requests
running, batch size limit and occupancy, and latency histograms (step, queue wait, request).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dllm.serve.jobs import Outcome

_STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    """Every metric the server exports; ``render()`` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, model: str, backend: str, device: str, replica: str, max_batch: int):
        r = self.registry = CollectorRegistry()
        Gauge("dllm_server_info", "the model this server answers for (always 1)",
              ["model", "backend", "device", "replica"], registry=r).labels(model, backend, device, replica).set(1)
        self.requests = Counter("dllm_requests", "requests by endpoint and outcome "
                                "(ok, cancelled, failed, rejected, overloaded)", ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("dllm_prompt_tokens", "prompt tokens of requests that ran", registry=r)
        self.completion_tokens = Counter("dllm_completion_tokens", "answer tokens returned (before EOS)", registry=r)
        self.decode_steps = Counter("dllm_decode_steps", "decode steps run (one model forward each)", registry=r)
        self.queue_depth = Gauge("dllm_queue_depth", "requests waiting for the decode worker", registry=r)
        self.running = Gauge("dllm_running_requests", "requests being decoded now", registry=r)
        self.max_batch = Gauge("dllm_max_batch", "most requests decoded together in one step "
                               "(1: requests run one at a time)", registry=r)
        self.max_batch.set(max_batch)
        self.batch_occupancy = Gauge("dllm_batch_occupancy", "requests in the running batch / dllm_max_batch",
                                     registry=r)
        self.step_seconds = Histogram("dllm_step_seconds", "wall time of one decode step", buckets=_STEP_BUCKETS,
                                      registry=r)
        self.queue_seconds = Histogram("dllm_queue_wait_seconds", "time from arrival to the start of decoding",
                                       buckets=_REQUEST_BUCKETS, registry=r)
        self.request_seconds = Histogram("dllm_request_seconds", "time from arrival to the last token",
                                         buckets=_REQUEST_BUCKETS, registry=r)

    def count(self, endpoint: str, outcome: Outcome) -> None:
        self.requests.labels(endpoint, outcome.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
