"""Resolve: the in-flight window is enforced here, every record goes on (as an event or as a failure to
dead-letter), transient fetch failures are retried and counted, and prepared images let their pixels go.

Driven with a FakeResolver and a DescribingGenerator; the real resolver's own cases are in
tests/unit/images/test_resolver.py.
"""

from __future__ import annotations

import json
import threading

import pytest

from consumer.errors import DecodeError, FetchError, ParseError, ProcessingError
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.settings import Settings
from consumer.stages import resolve as resolve_module
from consumer.stages.base import InputRecord, MessageRejected, WorkItem
from consumer.stages.resolve import Resolve
from tests.fakes import Collector, DescribingGenerator, FakeResolver, describe, image_of

TP = ("events", 0)
URL = "https://images.example.com/diagram.png"


def record(offset: int, value: bytes | None) -> InputRecord:
    return InputRecord(TP[0], TP[1], offset, b"key", value)


def event(event_id: str = "e-1", url: str = URL) -> bytes:
    return json.dumps({"id": event_id, "image": {"url": url}}).encode()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(resolve_module, "FETCH_BACKOFF_S", 0.0)


@pytest.fixture
def build():
    stages: list[Resolve] = []

    def make(max_in_flight: int = 64, prepares: bool = False, resolver: FakeResolver | None = None, **overrides):
        settings = Settings.from_environ({}, max_in_flight=max_in_flight, fetch_workers=2, **overrides)
        tracker, metrics, collector = OffsetTracker(), Metrics(), Collector[WorkItem]()
        stage = Resolve(
            settings, tracker, resolver or FakeResolver(), DescribingGenerator(prepares=prepares), metrics, collector
        )
        stages.append(stage)
        return stage, tracker, metrics, collector

    yield make
    for stage in stages:
        stage.close()


def test_a_full_window_refuses_the_record_and_tracks_nothing_of_it(build):
    stage, tracker, _, collector = build(max_in_flight=2)
    stage.submit(record(0, event("a")))
    stage.submit(record(1, event("b")))
    with pytest.raises(MessageRejected):
        stage.submit(record(2, event("c")))
    assert tracker.in_flight() == 2
    assert [item.record.offset for item in collector.taken] == [0, 1]

    tracker.done(TP, 0, collector.taken[0].epoch)
    stage.submit(record(2, event("c")))  # offered again once there is room
    assert [item.event_id for item in collector.taken] == ["a", "b", "c"]


def test_an_unparseable_record_goes_on_as_a_failure_with_the_id_it_names(build):
    resolver = FakeResolver()
    stage, tracker, _, collector = build(resolver=resolver)
    stage.submit(record(7, b'{"id": "order-7", "image": {"url": 42}}'))
    stage.submit(record(8, b"\xff not json"))
    first, second = collector.taken
    assert isinstance(first.failure, ParseError) and first.failure.reason == "invalid_field"
    assert first.event_id == "order-7" and first.image is None
    assert isinstance(second.failure, ParseError) and second.failure.reason == "not_json"
    assert second.event_id is None
    assert tracker.in_flight() == 2  # tracked: its dead letter settles it
    assert resolver.calls == []


def test_an_event_naming_an_unknown_adapter_is_a_parse_failure_listing_the_known_ones(build, tmp_path):
    resolver = FakeResolver({URL: image_of(5)})
    stage, tracker, _, collector = build(resolver=resolver, adapters=(("bpmn", tmp_path / "bpmn"),))
    for offset, adapter in enumerate(["uml", "bpmn", "default"]):
        stage.submit(
            record(offset, json.dumps({"id": f"e-{adapter}", "image": {"url": URL}, "adapter": adapter}).encode())
        )
    unknown, *known = collector.taken
    assert isinstance(unknown.failure, ParseError) and unknown.failure.reason == "unknown_adapter"
    assert unknown.event_id == "e-uml" and "default, bpmn" in unknown.failure.message
    assert [item.event.adapter for item in known if item.event] == ["bpmn", "default"]
    assert tracker.in_flight() == 3  # tracked: its dead letter settles it


def test_a_valid_event_goes_on_at_once_with_its_image_on_the_way(build):
    stage, _, metrics, collector = build(resolver=FakeResolver({URL: image_of(5)}))
    stage.submit(record(0, event("e-1")))
    (item,) = collector.taken
    assert item.event is not None and item.event.id == "e-1" and item.failure is None
    loaded = item.image.result(timeout=5)
    assert describe(loaded.image) == describe(image_of(5))
    assert metrics.registry.get_sample_value("diagram_stage_duration_seconds_count", {"stage": "fetch"}) == 1


def test_transient_fetch_failures_are_retried_and_counted(build):
    resolver = FakeResolver()
    resolver.fail(URL, FetchError("timed out", reason="timeout", retryable=True))
    resolver.fail(URL, FetchError("HTTP 503", reason="http_503", retryable=True))
    stage, _, metrics, collector = build(resolver=resolver)
    stage.submit(record(0, event()))
    loaded = collector.taken[0].image.result(timeout=5)
    assert loaded.image is not None
    assert resolver.calls == [URL] * 3
    assert metrics.registry.get_sample_value("diagram_events_total", {"outcome": "retried"}) == 2


def test_a_fetch_that_keeps_failing_gives_up_after_fetch_attempts(build):
    resolver = FakeResolver()
    resolver.fail(URL, *[FetchError("HTTP 503", reason="http_503", retryable=True)] * 5)
    stage, _, _, collector = build(resolver=resolver)
    stage.submit(record(0, event()))
    with pytest.raises(FetchError) as failure:
        collector.taken[0].image.result(timeout=5)
    assert failure.value.attempts == resolve_module.FETCH_ATTEMPTS
    assert len(resolver.calls) == resolve_module.FETCH_ATTEMPTS


def test_with_retry_delays_a_transient_failure_is_tried_once_and_left_to_the_retry_topics(build):
    resolver = FakeResolver()
    resolver.fail(URL, FetchError("HTTP 503", reason="http_503", retryable=True))
    stage, tracker, metrics, collector = build(resolver=resolver, retry_delays="1m")
    stage.submit(record(0, event()))
    with pytest.raises(FetchError) as failure:
        collector.taken[0].image.result(timeout=5)
    assert failure.value.retryable and failure.value.attempts == 1 and resolver.calls == [URL]
    assert metrics.registry.get_sample_value("diagram_events_total", {"outcome": "retried"}) == 0
    assert tracker.in_flight() == 1  # its slot is freed by the retry hop's acknowledgement, not by a sleep


@pytest.mark.parametrize(
    "error",
    [FetchError("HTTP 404", reason="http_404"), DecodeError("not an image", reason="not_an_image")],
    ids=["fetch", "decode"],
)
def test_a_permanent_failure_is_not_retried(build, error):
    resolver = FakeResolver()
    resolver.fail(URL, error)
    stage, _, metrics, collector = build(resolver=resolver)
    stage.submit(record(0, event()))
    with pytest.raises(type(error)) as failure:
        collector.taken[0].image.result(timeout=5)
    assert failure.value.attempts == 1 and resolver.calls == [URL]
    assert metrics.registry.get_sample_value("diagram_events_total", {"outcome": "retried"}) == 0


def test_a_prepared_image_lets_its_pixels_go_and_keeps_its_size(build):
    resolver = FakeResolver({URL: image_of(3, size=(40, 30))})
    stage, _, _, collector = build(prepares=True, resolver=resolver)
    stage.submit(record(0, event()))
    loaded = collector.taken[0].image.result(timeout=5)
    assert loaded.image is None and loaded.prepared is not None
    assert loaded.size == (40, 30)


def test_a_record_of_a_partition_being_rewound_is_dropped(build):
    stage, tracker, _, collector = build()
    tracker.assign(TP)
    tracker.hold(TP)
    stage.submit(record(5, event()))
    assert collector.taken == [] and tracker.in_flight() == 0


class Exploding:
    """A resolver or generator whose every call raises what nobody foresaw."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.inner = FakeResolver()

    def fetch(self, ref):
        if self.where == "fetch":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return self.inner.fetch(ref)

    def decode(self, data):
        if self.where == "decode":
            raise MemoryError("out of memory")
        return self.inner.decode(data)

    def close(self) -> None:
        return None

    def prepare_image(self, image):
        raise ValueError("height:20 and width:6000 must be larger than factor:32")

    def generate(self, requests):  # pragma: no cover - not called here
        raise AssertionError


@pytest.mark.parametrize("where, stage_name, error_class", [
    ("fetch", "fetch", "UnicodeEncodeError"), ("decode", "decode", "MemoryError"), ("prepare", "prepare", "ValueError"),
])  # fmt: skip
def test_an_exception_nobody_foresaw_is_its_stages_error(where, stage_name, error_class):
    """Whatever one event's image does to the code, the event is dead-lettered at the stage it was in."""
    settings = Settings.from_environ({}, fetch_workers=1)
    exploding = Exploding(where)
    generator = exploding if where == "prepare" else DescribingGenerator(prepares=True)
    collector = Collector[WorkItem]()
    stage = Resolve(settings, OffsetTracker(), exploding, generator, Metrics(), collector)
    try:
        stage.submit(record(0, event()))
        with pytest.raises(ProcessingError) as failure:
            collector.taken[0].image.result(timeout=5)
    finally:
        stage.close()
    assert (failure.value.stage, failure.value.reason, failure.value.error_class) == (
        stage_name,
        "unexpected",
        error_class,
    )


def test_a_parser_that_raises_anything_still_gives_a_parse_failure(build, monkeypatch):
    monkeypatch.setattr(resolve_module, "parse_event", lambda value, max_bytes: 1 / 0)
    stage, _, _, collector = build()
    stage.submit(record(0, event("e-9")))
    failure = collector.taken[0].failure
    assert failure is not None and (failure.stage, failure.reason) == ("parse", "unexpected")
    assert failure.error_class == "ZeroDivisionError" and collector.taken[0].event_id == "e-9"


def test_the_window_counts_bytes_too(build):
    stage, tracker, _, collector = build()
    stage.settings = stage.settings.model_copy(update={"max_in_flight_bytes": 1000})
    stage.submit(record(0, b'{"id": "big", "pad": "' + b"x" * 900 + b'"}'))  # the first always goes in
    with pytest.raises(MessageRejected):
        stage.submit(record(1, event("small")))  # 900-odd bytes in flight + this one > 1000
    tracker.done(TP, 0, collector.taken[0].epoch)
    stage.submit(record(1, event("small")))
    assert tracker.in_flight_bytes() == len(b"key") + len(event("small"))


def test_work_queued_for_a_partition_revoked_since_is_skipped(build):
    resolver = FakeResolver()
    stage, tracker, _, collector = build(resolver=resolver)
    gate = threading.Event()
    stage._pool.submit(gate.wait)  # both fetch threads busy: the next fetch waits in the queue
    stage._pool.submit(gate.wait)
    stage.submit(record(0, event()))
    tracker.revoke(TP)
    gate.set()
    with pytest.raises(resolve_module.CancelledError):
        collector.taken[0].image.result(timeout=5)
    assert resolver.calls == []  # never fetched
