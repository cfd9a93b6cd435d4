"""Infer: events are generated in batches, a poison event fails alone, stale work is dropped, shutdown
finishes the batch in progress and no other, and a crash of the thread stops the service.

Driven with a DescribingGenerator (its text names the image it saw) on the stage's own thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from consumer.errors import FetchError, InferError, ParseError
from consumer.images import LoadedImage
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.settings import Settings
from consumer.stages.base import Described, Failed, FatalLatch, Outcome, WorkItem
from consumer.stages.infer import Infer
from tests.fakes import Collector, DescribingGenerator, describe, image_of, tracked, wait_for

TP, OTHER = ("events", 0), ("events", 1)


def said(offset: int) -> str:
    return describe(image_of(offset))


@pytest.fixture
def build():
    stages: list[Infer] = []

    def make(generator: DescribingGenerator, batch_size: int = 8, batch_max_wait_ms: int = 10_000):
        settings = Settings.from_environ({}, batch_max_wait_ms=batch_max_wait_ms)
        tracker, metrics, latch, collector = OffsetTracker(), Metrics(), FatalLatch(), Collector[list[Outcome]]()
        stage = Infer(settings, batch_size, tracker, generator, metrics, latch, collector)
        stages.append(stage)
        return stage, tracker, metrics, latch, collector

    yield make
    for stage in stages:
        stage.close()
        stage.join(5)


def gathering(stage: Infer) -> bool:
    """The thread has taken the first event of a batch (nothing is queued) and waits for more."""
    return stage._queue.qsize() == 0


def outcomes(collector: Collector[list[Outcome]]) -> list[Outcome]:
    return [outcome for batch in collector.taken for outcome in batch]


def test_events_that_arrive_within_the_wait_share_one_batch(build):
    generator = DescribingGenerator()
    stage, tracker, metrics, _, collector = build(generator, batch_size=3, batch_max_wait_ms=10_000)
    stage.start()
    stage.submit(tracked(tracker, TP, 0))
    wait_for(lambda: gathering(stage), what="the thread waiting for more events")
    stage.submit(tracked(tracker, TP, 1))
    stage.submit(tracked(tracker, TP, 2))
    wait_for(lambda: collector.taken, what="the batch's outcomes")
    assert generator.calls == [[said(0), said(1), said(2)]]
    (batch,) = collector.taken
    assert all(isinstance(outcome, Described) for outcome in batch)
    assert [(o.item.record.offset, o.generation.text, o.batch_size) for o in batch] == [
        (0, said(0), 3),
        (1, said(1), 3),
        (2, said(2), 3),
    ]
    assert metrics.registry.get_sample_value("diagram_batch_size_sum") == 3
    assert metrics.registry.get_sample_value("diagram_generated_tokens_total") == 6
    assert metrics.seconds_per_event() >= 0  # learned from this batch: what the queued-work gauge scales lag by


def test_a_batch_is_cut_at_batch_size(build):
    generator = DescribingGenerator()
    stage, tracker, _, _, collector = build(generator, batch_size=2, batch_max_wait_ms=10_000)
    for offset in range(4):
        stage.submit(tracked(tracker, TP, offset))
    stage.start()
    wait_for(lambda: len(outcomes(collector)) == 4, what="four outcomes")
    assert generator.calls == [[said(0), said(1)], [said(2), said(3)]]


def on_adapter(item: WorkItem, adapter: str | None) -> WorkItem:
    assert item.event is not None
    item.event = item.event.model_copy(update={"adapter": adapter})
    return item


def test_with_several_adapters_a_batch_holds_one_adapter_and_the_others_start_the_next(build):
    generator = DescribingGenerator()
    stage, tracker, _, _, collector = build(generator, batch_size=3, batch_max_wait_ms=200)
    adapters = [None, "b", "default", "b", "c", "b", "default"]
    for offset, adapter in enumerate(adapters):
        stage.submit(on_adapter(tracked(tracker, TP, offset), adapter))
    failed = tracked(tracker, TP, 7)
    failed.failure = ParseError("not an event", reason="not_json")
    stage.submit(failed)
    stage.start()
    wait_for(lambda: len(outcomes(collector)) == 8, what="eight outcomes")
    # The oldest waiting event's adapter first (no `adapter` is `default`), batch size respected, no event lost.
    assert generator.calls == [[said(0), said(2), said(6)], [said(1), said(3), said(5)], [said(4)]]
    last = {o.item.record.offset: o for o in collector.taken[2]}
    assert sorted(last) == [4, 7] and isinstance(last[7], Failed)  # a failure joins any batch


def test_a_partial_batch_goes_once_the_wait_is_over(build):
    generator = DescribingGenerator()
    stage, tracker, _, _, collector = build(generator, batch_size=8, batch_max_wait_ms=20)
    stage.start()
    stage.submit(tracked(tracker, TP, 0))
    wait_for(lambda: collector.taken, what="a batch of one")
    assert generator.calls == [[said(0)]]


def test_a_failing_batch_is_retried_one_by_one_so_only_the_poison_event_fails(build):
    generator = DescribingGenerator(poison=lambda text: text == said(1))
    stage, tracker, _, _, collector = build(generator, batch_size=3)
    for offset in range(3):
        stage.submit(tracked(tracker, TP, offset))
    stage.start()
    wait_for(lambda: collector.taken, what="the batch's outcomes")
    assert generator.calls == [[said(0), said(1), said(2)], [said(0)], [said(1)], [said(2)]]
    first, poisoned, last = collector.taken[0]
    assert isinstance(first, Described) and first.generation.text == said(0) and first.batch_size == 1
    assert isinstance(last, Described) and last.generation.text == said(2)
    assert isinstance(poisoned, Failed) and poisoned.item.record.offset == 1
    assert isinstance(poisoned.error, InferError)
    assert poisoned.error.stage == "infer" and poisoned.error.reason == "PoisonImage"


def test_events_that_failed_before_the_model_pass_through_as_failures(build):
    generator = DescribingGenerator()
    stage, tracker, _, _, collector = build(generator, batch_size=3)
    unparseable = tracked(tracker, TP, 0)
    unparseable.failure, unparseable.event, unparseable.image = ParseError("not JSON", reason="not_json"), None, None
    unfetched: Future[LoadedImage] = Future()
    unfetched.set_exception(FetchError("HTTP 404", reason="http_404"))
    for item in (unparseable, tracked(tracker, TP, 1, image=unfetched), tracked(tracker, TP, 2)):
        stage.submit(item)
    stage.start()
    wait_for(lambda: collector.taken, what="the batch's outcomes")
    parse_failed, fetch_failed, described = collector.taken[0]
    assert isinstance(parse_failed, Failed) and parse_failed.error.reason == "not_json"
    assert isinstance(fetch_failed, Failed) and fetch_failed.error.reason == "http_404"
    assert isinstance(described, Described)
    assert generator.calls == [[said(2)]]


def test_events_of_a_revoked_or_rewound_partition_are_dropped(build):
    generator = DescribingGenerator()
    stage, tracker, _, _, collector = build(generator, batch_size=3)
    stale = tracked(tracker, TP, 0)
    current = tracked(tracker, OTHER, 5)
    tracker.assign(TP)  # a new epoch: what was in flight for TP belongs to the old one
    stage.submit(stale)
    stage.submit(current)
    stage.submit(tracked(tracker, TP, 1))
    stage.start()
    wait_for(lambda: collector.taken, what="the batch's outcomes")
    assert [o.item.record.offset for o in collector.taken[0]] == [5, 1]
    assert generator.calls == [[said(5), said(1)]]


def test_join_finishes_the_batch_in_progress_and_starts_no_other(build):
    gate = threading.Event()
    generator = DescribingGenerator(gate=gate)
    stage, tracker, _, _, collector = build(generator, batch_size=1)
    stage.start()
    stage.submit(tracked(tracker, TP, 0))
    wait_for(lambda: generator.calls, what="the first batch generating")
    stage.submit(tracked(tracker, TP, 1))
    assert stage.join(0) is False  # still generating
    gate.set()
    assert stage.join(5) is True
    assert [o.item.record.offset for o in outcomes(collector)] == [0]
    assert generator.calls == [[said(0)]]  # the queued event is left for the group to redo


def test_join_while_a_batch_is_still_gathering_generates_nothing(build):
    generator = DescribingGenerator()
    stage, tracker, _, _, collector = build(generator, batch_size=8, batch_max_wait_ms=10_000)
    stage.start()
    stage.submit(tracked(tracker, TP, 0))
    wait_for(lambda: gathering(stage), what="the thread waiting for more events")
    assert stage.join(5) is True
    assert generator.calls == [] and collector.taken == []


def test_an_error_in_the_inference_thread_trips_the_latch(build):
    generator = DescribingGenerator()
    stage, tracker, _, latch, collector = build(generator, batch_size=1)
    collector.failure = RuntimeError("records stage broke")
    stage.start()
    stage.submit(tracked(tracker, TP, 0))
    wait_for(latch.tripped, what="the latch tripped")
    assert isinstance(latch.error, RuntimeError) and str(latch.error) == "records stage broke"
    assert stage.join(5) is True  # the thread ended


def test_an_image_that_never_resolves_is_dead_lettered_not_waited_for(build, monkeypatch):
    """A fetch thread stuck for good must not hold its batch and partition with it: after the fetch's own
    deadlines and a decode allowance (here cut to 0.2 s) the event is a fetch/timeout failure."""
    from consumer.stages import infer as infer_module

    monkeypatch.setattr(infer_module, "resolve_wait_s", lambda settings: 0.2)
    generator = DescribingGenerator()
    stage, tracker, _, _, collector = build(generator, batch_size=2)
    never: Future[LoadedImage] = Future()
    stage.submit(tracked(tracker, TP, 0, image=never))
    stage.submit(tracked(tracker, TP, 1))
    stage.start()
    wait_for(lambda: collector.taken, what="the batch's outcomes")
    stuck, described = collector.taken[0]
    assert isinstance(stuck, Failed) and (stuck.error.stage, stuck.error.reason) == ("fetch", "timeout")
    assert isinstance(described, Described) and generator.calls == [[said(1)]]


def test_an_image_future_that_raises_anything_is_a_failure_not_a_crash(build):
    generator = DescribingGenerator()
    stage, tracker, _, latch, collector = build(generator, batch_size=1)
    odd: Future[LoadedImage] = Future()
    odd.set_exception(KeyError("nobody raised this on purpose"))
    stage.submit(tracked(tracker, TP, 0, image=odd))
    stage.start()
    wait_for(lambda: collector.taken, what="the outcome")
    (failed,) = collector.taken[0]
    assert isinstance(failed, Failed) and (failed.error.reason, failed.error.error_class) == ("unexpected", "KeyError")
    assert not latch.tripped()
