"""The cache step in infer: hits skip the model, copies in one batch are generated once, misses are cached."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import replace

from consumer.engine.adapters import AdapterVersion
from consumer.engine.base import Generation
from consumer.engine.echo import EchoEngine
from consumer.errors import InferError
from consumer.images import LoadedImage
from consumer.offsets import OffsetTracker
from consumer.result_cache.key import ResultKeyer, content_hash
from consumer.result_cache.step import Ready, ResultStep
from consumer.result_cache.store import ResultCache
from consumer.settings import Settings
from consumer.stages.base import Described, Failed, Outcome
from tests.fakes import image_of, tracked

TP = ("diagram-events", 0)
SETTINGS = Settings.from_environ({}, result_cache_topic="cache")
INFO = EchoEngine().load()


def ready_items(*images: bytes) -> Ready:
    tracker = OffsetTracker()
    ready = []
    for offset, data in enumerate(images):
        future: Future[LoadedImage] = Future()
        future.set_result(LoadedImage(image=image_of(offset), source_bytes=len(data), content_hash=content_hash(data)))
        item = tracked(tracker, TP, offset, image=future)
        ready.append((item, future.result()))
    return ready


class Model:
    """`generate` as infer's `_generate`: one Described per event, the text naming its image's hash."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail

    def __call__(self, ready: Ready) -> list[Outcome]:
        self.calls.append(len(ready))
        if self.fail:
            return [Failed(item, InferError("model failed", reason="RuntimeError")) for item, _ in ready]
        return [
            Described(item, loaded, Generation(f"described {loaded.content_hash}", 5), 0.5, len(ready))
            for item, loaded in ready
        ]


def step(cache: ResultCache | None) -> ResultStep:
    return ResultStep(SETTINGS, ResultKeyer.for_engine(SETTINGS, INFO), INFO, cache)


def test_a_miss_is_generated_and_cached_then_the_same_image_is_a_hit():
    cache, model = ResultCache(1_000_000), Model()
    first = step(cache).answer(ready_items(b"one"), model)
    assert model.calls == [1]
    assert isinstance(first[0], Described) and first[0].cache == "miss" and first[0].result_key in cache
    second = step(cache).answer(ready_items(b"one"), model)
    assert model.calls == [1], "a hit must not run the model"
    hit = second[0]
    assert isinstance(hit, Described) and hit.cache == "hit"
    assert hit.generation.text == first[0].generation.text and hit.result_key == first[0].result_key
    assert hit.batch_size == 0 and hit.generation_time == 0.0


def test_copies_within_one_batch_are_generated_once():
    cache, model = ResultCache(1_000_000), Model()
    outcomes = step(cache).answer(ready_items(b"one", b"two", b"one", b"one"), model)
    assert model.calls == [2]
    assert len(outcomes) == 4 and all(isinstance(o, Described) for o in outcomes)
    by_offset = {o.item.record.offset: o for o in outcomes if isinstance(o, Described)}
    assert [by_offset[n].cache for n in range(4)] == ["miss", "miss", "hit", "hit"]
    assert by_offset[2].generation == by_offset[3].generation == by_offset[0].generation


def test_a_failed_generation_fails_its_copies_and_caches_nothing():
    cache, model = ResultCache(1_000_000), Model(fail=True)
    outcomes = step(cache).answer(ready_items(b"one", b"one"), model)
    assert model.calls == [1]
    assert len(outcomes) == 2 and all(isinstance(o, Failed) for o in outcomes)
    assert cache.entries == 0


def test_without_a_cache_every_event_is_generated_and_keyed():
    model = Model()
    outcomes = step(None).answer(ready_items(b"one", b"one"), model)
    assert model.calls == [2]
    assert [o.cache for o in outcomes if isinstance(o, Described)] == ["off", "off"]
    keys = {o.result_key for o in outcomes if isinstance(o, Described)}
    assert len(keys) == 1 and None not in keys


class Adapters:
    """The engine's `adapter_version`: each name's current content, reloadable by the test."""

    def __init__(self) -> None:
        self.versions = {
            "default": AdapterVersion("default", "/w/default", "hash-default-1"),
            "b": AdapterVersion("b", "/w/b", "hash-b-1"),
        }

    def __call__(self, name: str) -> AdapterVersion:
        return self.versions[name]


def with_adapters(ready: Ready, *names: str | None) -> Ready:
    return [
        (replace(item, event=item.event.model_copy(update={"adapter": name})), loaded)
        for (item, loaded), name in zip(ready, names, strict=True)
    ]


class AdapterModel(Model):
    """Generates as the engine does: each event on its adapter's current version."""

    def __init__(self, adapters: Adapters, reload_before_running: str | None = None) -> None:
        super().__init__()
        self.adapters, self.reload_before_running = adapters, reload_before_running

    def __call__(self, ready: Ready) -> list[Outcome]:
        if self.reload_before_running:
            name = self.reload_before_running
            self.adapters.versions[name] = AdapterVersion(name, f"/w/{name}", f"hash-{name}-2")
        self.calls.append(len(ready))
        outcomes: list[Outcome] = []
        for item, loaded in ready:
            version = self.adapters(item.event.adapter or "default")
            generation = Generation(f"{version.hash} described {loaded.content_hash}", 5, version)
            outcomes.append(Described(item, loaded, generation, 0.5, len(ready)))
        return outcomes


def test_each_event_is_keyed_by_its_own_adapters_content_and_a_hit_names_that_adapter():
    adapters, cache = Adapters(), ResultCache(1_000_000)
    model = AdapterModel(adapters)
    cached = ResultStep(SETTINGS, ResultKeyer.for_engine(SETTINGS, INFO), INFO, cache, adapters)
    first = cached.answer(with_adapters(ready_items(b"one", b"one", b"one"), None, "default", "b"), model)
    assert model.calls == [2], "the same image under `default` and under `b` are two results"
    by_offset = {o.item.record.offset: o for o in first if isinstance(o, Described)}
    assert [by_offset[n].cache for n in range(3)] == ["miss", "hit", "miss"]
    assert by_offset[0].result_key == by_offset[1].result_key != by_offset[2].result_key
    again = cached.answer(with_adapters(ready_items(b"one"), "b"), model)
    assert model.calls == [2]
    hit = again[0]
    assert isinstance(hit, Described) and hit.cache == "hit" and hit.result_key == by_offset[2].result_key
    assert hit.generation.adapter == adapters.versions["b"]


def test_an_adapter_reloaded_between_lookup_and_model_call_keys_the_event_by_what_ran():
    adapters, cache = Adapters(), ResultCache(1_000_000)
    cached = ResultStep(SETTINGS, ResultKeyer.for_engine(SETTINGS, INFO), INFO, cache, adapters)
    ready = with_adapters(ready_items(b"one", b"one"), "b", "b")
    before = cached.key_of(*ready[0], adapters("b"))
    [generated, copy] = cached.answer(ready, AdapterModel(adapters, reload_before_running="b"))
    assert isinstance(generated, Described) and generated.generation.adapter.hash == "hash-b-2"
    after = cached.key_of(*ready[0], adapters("b"))
    assert generated.result_key == after != before and after in cache and before not in cache
    assert isinstance(copy, Described) and copy.cache == "hit" and copy.result_key == after
