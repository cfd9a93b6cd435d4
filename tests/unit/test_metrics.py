"""Metric families fed from librdkafka statistics and from the model's measured batches."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from consumer.metrics import GENERATION_HALF_LIFE_BATCHES, Metrics


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


def sample(metrics: Metrics, name: str) -> float:
    """The value /metrics shows for an unlabelled gauge."""
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_queued_work_is_the_lag_times_the_measured_seconds_per_event():
    metrics = Metrics()
    metrics.observe_consumer_stats(
        stats_document(
            {
                "0": {"desired": True, "consumer_lag": 7},
                "1": {"desired": True, "consumer_lag": 3},
                "2": {"desired": False, "consumer_lag": 50},  # another member's work
            }
        )
    )
    # No batch measured yet: the work is unknown, which Prometheus must not read as none.
    assert math.isnan(sample(metrics, "diagram_queued_work_seconds"))
    assert math.isnan(sample(metrics, "diagram_generation_seconds_per_event"))
    metrics.observe_generation(32.0, 16)  # 2 s per event
    assert sample(metrics, "diagram_generation_seconds_per_event") == 2.0
    assert sample(metrics, "diagram_queued_work_seconds") == 20.0
    metrics.observe_consumer_stats(stats_document({"0": {"desired": True, "consumer_lag": 0}}))
    assert sample(metrics, "diagram_queued_work_seconds") == 0.0


def test_queued_work_counts_a_partition_without_a_commit_from_its_low_watermark():
    metrics = Metrics()
    metrics.observe_generation(1.0, 1)
    metrics.observe_consumer_stats(
        stats_document(
            {
                # Real librdkafka 2.x fields of a fresh group's partition (read_committed): 3 of 20 polled.
                "0": {"desired": True, "consumer_lag": -1, "lo_offset": 0, "hi_offset": 20, "ls_offset": 20},
                "1": {"desired": True, "consumer_lag": -1, "lo_offset": -1001, "hi_offset": -1001},  # not fetched yet
                "2": {"desired": True, "consumer_lag": 5},
            }
        )
    )
    assert sample(metrics, "diagram_queued_work_seconds") == 25.0
    assert lag_samples(metrics) == {("in", "2"): 5.0}  # the lag series stays what is committed


def test_retry_topic_lag_is_reported_but_is_not_queued_work():
    """Records in a retry topic wait up to a RETRY_DELAYS delay: more replicas would not make them due."""
    metrics = Metrics()
    metrics.deferred_topics = frozenset({"in-retry-600s"})
    metrics.observe_generation(1.0, 1)
    document = stats_document({"0": {"desired": True, "consumer_lag": 4}})
    document["topics"]["in-retry-600s"] = {
        "partitions": {
            "0": {"desired": True, "consumer_lag": 900},
            "1": {"desired": True, "consumer_lag": -1, "lo_offset": 0, "hi_offset": 50, "ls_offset": 50},
        }
    }
    metrics.observe_consumer_stats(document)
    assert sample(metrics, "diagram_queued_work_seconds") == 4.0
    assert lag_samples(metrics) == {("in", "0"): 4.0, ("in-retry-600s", "0"): 900.0}


def test_recent_batches_outweigh_old_ones_and_full_batches_outweigh_lone_events():
    metrics = Metrics()
    metrics.observe_generation(160.0, 16)  # 10 s per event
    metrics.observe_generation(1.0, 1)  # one lone fast event hardly moves it
    assert 9.0 < metrics.seconds_per_event() < 10.0
    for _ in range(GENERATION_HALF_LIFE_BATCHES * 4):
        metrics.observe_generation(16.0, 16)  # the hardware got faster: 1 s per event
    assert 1.0 < metrics.seconds_per_event() < 1.1


@given(batches=st.lists(st.tuples(st.floats(0, 3600, allow_nan=False), st.integers(1, 256)), min_size=1, max_size=50))
def test_seconds_per_event_stays_within_the_batches_it_learnt_from(batches):
    metrics = Metrics()
    for seconds, size in batches:
        metrics.observe_generation(seconds, size)
    per_event = [seconds / size for seconds, size in batches]
    assert min(per_event) * (1 - 1e-9) <= metrics.seconds_per_event() <= max(per_event) * (1 + 1e-9)


def test_a_failed_or_empty_call_teaches_nothing():
    metrics = Metrics()
    metrics.observe_generation(5.0, 0)
    metrics.observe_generation(math.nan, 4)
    assert math.isnan(metrics.seconds_per_event())
