"""The server's figures for Prometheus (GET /metrics), through the maintained client library, in a registry
of the app's own (not the process-wide default: two apps in one process, as in tests, stay apart)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The counters, gauges and histograms the app and the decode loop update."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.active_streams = Gauge("charlm_active_streams", "Streams in the batch or running their prompt.", registry=r)
        self.queued_requests = Gauge("charlm_queued_requests", "Requests waiting for rows, a score or a beam search.", registry=r)
        self.generated_chars = Counter("charlm_generated_characters", "Characters of text generated.", registry=r)
        self.prompt_chars = Counter("charlm_prompt_characters", "Characters of prompts and scored texts taken.", registry=r)
        self.step_seconds = Histogram(
            "charlm_step_seconds", "Time of one batched decode step (every stream one symbol).", buckets=STEP_BUCKETS, registry=r
        )
        self.batch_rows = Histogram("charlm_batch_rows", "Streams stepped together per step.", buckets=BATCH_BUCKETS, registry=r)
        self.first_char_seconds = Histogram(
            "charlm_time_to_first_character_seconds",
            "From a request's arrival to its first generated text.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "charlm_requests", "Requests answered, by route and HTTP status.", ["route", "status"], registry=r
        )
        self.model_errors = Counter(
            "charlm_model_errors", "Decode steps or tasks the model failed (their requests got 500).", registry=r
        )

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)
