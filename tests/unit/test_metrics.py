"""Metric families fed from librdkafka statistics."""

from __future__ import annotations

from consumer.metrics import Metrics


def stats_document(partitions: dict[str, dict]) -> dict:
    return {"topics": {"in": {"partitions": {"-1": {"desired": False, "consumer_lag": -1}, **partitions}}}}


def lag_samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    family = next(f for f in metrics.registry.collect() if f.name == "diagram_consumer_lag")
    return {(s.labels["topic"], s.labels["partition"]): s.value for s in family.samples}


def test_consumer_lag_comes_from_statistics_for_owned_partitions_only():
    metrics = Metrics()
    metrics.observe_consumer_stats(
        stats_document(
            {
                "0": {"desired": True, "consumer_lag": 7},
                "1": {"desired": True, "consumer_lag": -1},  # nothing committed yet: unknown, not zero
                "2": {"desired": False, "consumer_lag": 3},  # another member's partition
            }
        )
    )
    assert lag_samples(metrics) == {("in", "0"): 7.0}
    metrics.observe_consumer_stats(stats_document({"1": {"desired": True, "consumer_lag": 2}}))
    assert lag_samples(metrics) == {("in", "1"): 2.0}  # partition 0 went elsewhere: its series is gone
