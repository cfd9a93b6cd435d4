"""The in-memory cache: bounded by RESULT_CACHE_MAX_BYTES, least recently used entries out first."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from consumer.metrics import Metrics
from consumer.result_cache.store import CacheEntry, ResultCache


def entry(text: str = "| 1 | step | role |") -> CacheEntry:
    return CacheEntry(
        description=text,
        output_tokens=3,
        content_hash="ab" * 32,
        model="m",
        adapter=None,
        dtype="float32",
        created_at=1_800_000_000.0,
    )


def size_of(key: str, cached: CacheEntry) -> int:
    return len(key) + len(cached.encode())


def test_the_least_recently_used_entry_goes_first():
    one = size_of("a", entry())
    cache = ResultCache(max_bytes=3 * one)
    for key in "abc":
        cache.put(key, entry())
    assert cache.lookup("a") is not None  # a is now the most recently used
    cache.put("d", entry())
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.entries == 3 and cache.size_bytes == 3 * one


def test_an_entry_larger_than_the_whole_cache_is_not_kept():
    cache = ResultCache(max_bytes=size_of("small", entry("x")) + 10)
    cache.put("small", entry("x"))
    assert cache.put("big", entry("x" * 200)) is False
    assert "big" not in cache and "small" in cache


def test_records_from_the_topic_tombstones_and_unreadable_values():
    cache = ResultCache(max_bytes=10_000)
    cache.put_record(b"k", entry().encode())
    assert cache.lookup("k") == entry()
    cache.put_record(b"k", None)  # a tombstone removes the entry
    assert "k" not in cache and cache.size_bytes == 0
    cache.put_record(b"bad", b"not json")
    cache.put_record(b"future", b'{"v": 2, "description": "d", "output_tokens": 1, "content_hash": "x", '
                     b'"model": "m", "adapter": null, "dtype": "d"}')  # fmt: skip
    cache.put_record(None, entry().encode())
    assert cache.entries == 0


def test_metrics_count_hits_misses_entries_and_bytes():
    metrics = Metrics()
    cache = ResultCache(max_bytes=10_000, metrics=metrics)
    cache.put("k", entry())
    cache.lookup("k")
    cache.lookup("k")
    cache.lookup("other")
    text = generate_latest(metrics.registry).decode()
    assert "diagram_result_cache_hits_total 2.0" in text
    assert "diagram_result_cache_misses_total 1.0" in text
    assert "diagram_result_cache_entries 1.0" in text
    assert f"diagram_result_cache_bytes {float(size_of('k', entry()))}" in text


operations = st.lists(
    st.tuples(st.sampled_from(["put", "lookup", "remove"]), st.integers(0, 12), st.integers(0, 60)), max_size=80
)


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(0, 600))
def test_the_bound_holds_and_evictions_follow_recency(ops, max_bytes):
    """Against a reference model: the cache holds exactly the most recently used entries that fit, in
    order, and never more bytes than its bound."""
    cache = ResultCache(max_bytes=max_bytes)
    model: OrderedDict[str, int] = OrderedDict()
    for op, number, length in ops:
        key = f"key-{number}"
        if op == "put":
            cached = entry("d" * length)
            size = size_of(key, cached)
            model.pop(key, None)
            if size <= max_bytes:
                model[key] = size
                while sum(model.values()) > max_bytes:
                    model.popitem(last=False)
            cache.put(key, cached)
        elif op == "lookup":
            assert (cache.lookup(key) is not None) == (key in model)
            if key in model:
                model.move_to_end(key)
        else:
            cache.remove(key)
            model.pop(key, None)
        assert cache.size_bytes == sum(model.values()) <= max_bytes
        assert cache.entries == len(model)
        assert all(k in cache for k in model)
