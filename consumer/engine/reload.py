"""ADAPTER_POLL_SECONDS: an adapter directory whose content changes is loaded again, without a restart.

A thread looks at every adapter's directory each ADAPTER_POLL_SECONDS. A look is a stat of its files;
only when a file's name, size or modification time changed is the content hashed
(consumer/engine/adapter_hash.py), and when the hash differs from what runs, the engine loads it
(`ServesAdapters.reload_adapter`): the model call in flight finishes on the old weights, later ones use
the new, and their results carry the new hash. A reload that fails (no adapter any more, unreadable
files, weights that do not fit the model) leaves the old adapter serving, is logged with its cause and
counted (diagram_adapter_reloads_total{outcome="failed"}), and is not tried again until the content
changes again. Nothing here stops the replica.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Mapping

from consumer.engine.adapter_hash import adapter_files, adapter_hash
from consumer.engine.base import ServesAdapters
from consumer.metrics import Metrics

logger = logging.getLogger(__name__)

Signature = tuple[tuple[str, int, int], ...]
"""An adapter directory's files as a stat sees them: (name, size, modification time in ns) each."""


def file_signature(path: Path) -> Signature:
    """The stat of the files that define the adapter in `path` (empty without one)."""
    try:
        stats = [(file.name, file.stat()) for file in adapter_files(path)]
    except OSError:
        return ()
    return tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)


class AdapterWatcher:
    """Polls each adapter's directory on its own thread (`start`, `stop`); `check` is one round."""

    def __init__(self, engine: ServesAdapters, paths: Mapping[str, Path], interval_s: float, metrics: Metrics) -> None:
        self.engine, self.paths, self.interval_s, self.metrics = engine, dict(paths), interval_s, metrics
        self._seen: dict[str, Signature] = {}
        """What each directory looked like at the last round; the first round hashes every adapter."""
        self._refused: dict[str, str | None] = {}
        """The content of the last failed reload per name: not tried again until it changes."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapter-reload", daemon=True)

    def start(self) -> AdapterWatcher:
        self._thread.start()
        logger.info(
            "watching %d adapter directories for new content every %.0f s (ADAPTER_POLL_SECONDS)",
            len(self.paths),
            self.interval_s,
        )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def check(self) -> None:
        """Look at every adapter once; reload those whose content changed."""
        for name, path in self.paths.items():
            try:
                self._check(name, path)
            except Exception as exc:  # noqa: BLE001 - a reload must never stop the replica
                logger.error(
                    "adapter %r at %s: cannot check for new content, still serving the old: %s", name, path, exc
                )
                self.metrics.adapter_reloads.labels(name, "failed").inc()

    def _check(self, name: str, path: Path) -> None:
        signature = file_signature(path)
        if self._seen.get(name) == signature:
            return
        self._seen[name] = signature
        content = adapter_hash(path)
        current = self.engine.adapter_version(name)
        if content == current.hash or (name in self._refused and self._refused[name] == content):
            return
        logger.info("adapter %r at %s has new content (%s): reloading", name, path, _short(content))
        started = time.perf_counter()
        try:
            version = self.engine.reload_adapter(name)
        except Exception as exc:  # noqa: BLE001 - EngineLoadError, or anything peft raises: the old one serves on
            self._refused[name] = content
            logger.error(
                "adapter %r: the new content at %s was not loaded; still serving %s: %s",
                name,
                path,
                _short(current.hash),
                exc,
            )
            self.metrics.adapter_reloads.labels(name, "failed").inc()
            return
        self._refused.pop(name, None)
        logger.info(
            "adapter %r reloaded from %s in %.2f s: %s -> %s",
            name,
            path,
            time.perf_counter() - started,
            _short(current.hash),
            _short(version.hash),
        )
        self.metrics.adapter_reloads.labels(name, "ok").inc()
        self.metrics.record_adapter(name, version.hash, current.hash)


def _short(content_hash: str | None) -> str:
    return content_hash[:12] if content_hash else "no adapter"
