"""The replica's in-memory copy of the cache topic: result key -> entry, least recently used first out.

Bounded by RESULT_CACHE_MAX_BYTES of keys and values as they travel on the topic (the JSON below); the
Python objects behind them take about twice that in memory (docs/result-cache.md, sizing). Written by
the follower thread (entries read from the topic, own and other replicas') and the inference thread
(entries it has just generated); read by the inference thread. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from consumer.metrics import Metrics

if TYPE_CHECKING:
    from consumer.engine.base import EngineInfo
    from consumer.stages.base import Described

logger = logging.getLogger(__name__)

ENTRY_VERSION = 1


class CacheEntry(BaseModel):
    """A cache topic record's value: what a hit needs to answer without the model."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = ENTRY_VERSION
    description: str
    output_tokens: int = Field(ge=0)
    content_hash: str
    model: str
    adapter: str | None
    """The adapter's path as results report it (its content is in the key)."""
    dtype: str
    created_at: float = Field(default_factory=time.time, description="Unix time the description was generated")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, value: bytes) -> CacheEntry | None:
        """The entry in a cache record's value; None for one this version cannot read (logged)."""
        try:
            entry = cls.model_validate_json(value)
        except ValidationError as exc:
            logger.warning("ignoring an unreadable result cache entry (%d bytes): %s", len(value), exc.errors()[:1])
            return None
        return entry if entry.v == ENTRY_VERSION else None


class ResultCache:
    """Result key -> `CacheEntry`, up to `max_bytes`; `lookup` counts hits and misses."""

    def __init__(self, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[CacheEntry, int]] = OrderedDict()
        self._bytes = 0
        if metrics is not None:
            metrics.track_result_cache(lambda: self.entries, lambda: self.size_bytes)

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def lookup(self, key: str) -> CacheEntry | None:
        """The entry for `key`, now the most recently used; counted as a hit or a miss."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
        if self.metrics is not None:
            (self.metrics.result_cache_hits if found is not None else self.metrics.result_cache_misses).inc()
        return found[0] if found is not None else None

    def count_hit(self) -> None:
        """A hit found elsewhere (a duplicate within a batch, answered by its first copy's generation)."""
        if self.metrics is not None:
            self.metrics.result_cache_hits.inc()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: str, entry: CacheEntry, size: int | None = None) -> bool:
        """Keep `entry` under `key` as the most recently used, evicting the least recently used ones
        until the cache fits; `size` is its record's key and value bytes (computed if not given).
        False when the entry alone is larger than the whole cache (it is not kept)."""
        size = size if size is not None else len(key) + len(entry.encode())
        with self._lock:
            self._drop(key)
            if size > self.max_bytes:
                return False
            self._entries[key] = (entry, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
        return True

    def put_record(self, key: bytes | None, value: bytes | None) -> None:
        """A record read from the cache topic: an entry, or a tombstone (value None) that removes one."""
        if key is None:
            return
        text = key.decode("ascii", "replace")
        if value is None:
            self.remove(text)
            return
        entry = CacheEntry.decode(value)
        if entry is not None:
            self.put(text, entry, len(key) + len(value))

    def remove(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= found[1]


MAX_ENTRY_BYTES = 256 * 1024
"""A description whose entry is larger than this is not cached (384 new tokens make about 2 KB; 8192,
the most MAX_NEW_TOKENS allows, about 40 KB): a cache record must never be one the producer or a
topic with the default max.message.bytes (1 MB) refuses."""


def cache_entry(described: Described, info: EngineInfo) -> CacheEntry | None:
    """The entry a generated description leaves in the cache; None without the image's content hash."""
    content = described.loaded.content_hash
    if content is None:
        return None
    return CacheEntry(
        description=described.generation.text,
        output_tokens=described.generation.output_tokens,
        content_hash=content,
        model=info.model,
        adapter=described.generation.adapter.path if described.generation.adapter else info.adapter,
        dtype=info.dtype,
    )
