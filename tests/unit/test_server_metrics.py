"""The steering layer's Prometheus metrics: created once per process, under the documented names and labels."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest

from cna_vllm.server.metrics import SteeringMetrics, metrics


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_one_set_per_process():
    assert metrics() is metrics() and isinstance(metrics(), SteeringMetrics)


def test_counters_and_gauges_reach_the_registry_with_their_labels():
    m = metrics()
    before = value("cna_steering_circuit_requests_total", circuit="refusal", mode="patch")
    m.items.labels(circuit="refusal", mode="patch").inc()
    m.items.labels(circuit="refusal", mode="patch").inc()
    assert value("cna_steering_circuit_requests_total", circuit="refusal", mode="patch") == before + 2
    before = value("cna_steering_requests_total", endpoint="chat", steered="true")
    m.requests.labels(endpoint="chat", steered="true").inc()
    assert value("cna_steering_requests_total", endpoint="chat", steered="true") == before + 1
    m.rows_capacity.set(7)
    m.circuits_loaded.set(3)
    assert value("cna_steering_rows_capacity") == 7 and value("cna_steering_circuits_loaded") == 3
    before = value("cna_steering_row_wait_seconds_count")
    m.row_wait.observe(0.002)
    assert value("cna_steering_row_wait_seconds_count") == before + 1
    assert value("cna_steering_row_wait_seconds_bucket", le="0.005") >= 1  # the documented buckets


def test_every_metric_is_exposed_with_help_text():
    text = generate_latest(REGISTRY).decode()
    for name in ("cna_steering_requests", "cna_steering_circuit_requests", "cna_steering_rejected_requests",
                 "cna_steering_rows_in_use", "cna_steering_rows_capacity", "cna_steering_requests_waiting_for_row",
                 "cna_steering_row_wait_seconds", "cna_steering_circuits_loaded", "cna_steering_variant_requests"):
        assert f"# HELP {name}" in text, name
