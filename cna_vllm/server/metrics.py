"""Prometheus metrics of the steering layer, served by vLLM's own ``/metrics``.

vLLM's API server reads either the default registry or, in multiprocess mode, the
``PROMETHEUS_MULTIPROC_DIR`` files; ``prometheus_client`` metrics created in this process
land in whichever is active, so they appear next to vLLM's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram


@dataclass
class SteeringMetrics:
    requests: Counter
    items: Counter
    rejected: Counter
    rows_in_use: Gauge
    rows_capacity: Gauge
    waiting: Gauge
    row_wait: Histogram
    circuits_loaded: Gauge
    variants: Counter


_METRICS: SteeringMetrics | None = None


def metrics() -> SteeringMetrics:
    """The process-wide metrics (created once: prometheus names are global)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = SteeringMetrics(
            requests=Counter(
                "cna_steering_requests", "Generation requests seen by the steering layer", ["endpoint", "steered"]
            ),
            items=Counter(
                "cna_steering_circuit_requests",
                "Steered requests by circuit and mode (one count per item)",
                ["circuit", "mode"],
            ),
            rejected=Counter("cna_steering_rejected_requests", "Requests refused with 4xx", ["code"]),
            rows_in_use=Gauge(
                "cna_steering_rows_in_use",
                "Steering-table rows in use (distinct steering specs in flight)",
                multiprocess_mode="livesum",
            ),
            rows_capacity=Gauge(
                "cna_steering_rows_capacity", "Steering-table rows (max distinct specs)", multiprocess_mode="max"
            ),
            waiting=Gauge(
                "cna_steering_requests_waiting_for_row",
                "Steered requests waiting for a free steering-table row",
                multiprocess_mode="livesum",
            ),
            row_wait=Histogram(
                "cna_steering_row_wait_seconds",
                "Seconds a steered request waited in the server's admission gate for a steering-table row",
                buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            ),
            circuits_loaded=Gauge(
                "cna_steering_circuits_loaded",
                "Circuits and vector sets the engine steers with",
                multiprocess_mode="max",
            ),
            variants=Counter(
                "cna_steering_variant_requests",
                "Generation requests that named a steered variant as their model",
                ["model"],
            ),
        )
    return _METRICS
