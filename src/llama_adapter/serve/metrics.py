"""The server's Prometheus metrics, in a registry of its own (several servers may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llama_adapter_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.queue = Gauge("llama_adapter_queue_length", "requests waiting for a decode slot", registry=r)
        self.running = Gauge("llama_adapter_running_sequences", "sequences being decoded", registry=r)
        self.tokens = Counter("llama_adapter_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("llama_adapter_time_to_first_token_seconds",
                              "from a request's arrival in the queue to its first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.per_token = Histogram("llama_adapter_time_per_output_token_seconds",
                                   "time between a sequence's tokens while decoding", buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.batch_rows = Histogram("llama_adapter_decode_batch_rows", "sequences in each decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.prefill_rows = Histogram("llama_adapter_prefill_batch_rows", "requests in each prefill pass",
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_adapters = Histogram("llama_adapter_decode_batch_adapters",
                                        "distinct models (adapters or the base) in each decode step",
                                        buckets=(1, 2, 3, 4, 8), registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
