"""ADAPTER_POLL_SECONDS: new content in an adapter directory is reloaded once; a failed reload keeps the
old adapter, is counted and logged, and is not retried until the content changes again.

Driven with a fake engine; the real engine's reload is in test_adapters.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from consumer.engine import reload as reload_module
from consumer.engine.adapter_hash import adapter_hash
from consumer.engine.adapters import AdapterVersion
from consumer.engine.base import EngineLoadError
from consumer.engine.reload import AdapterWatcher
from consumer.metrics import Metrics


def write_adapter(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


class FakeEngine:
    """Serves the adapters at `paths`; a reload reads the directory's content again, or fails on cue."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.versions = {name: AdapterVersion(name, str(path), adapter_hash(path)) for name, path in paths.items()}
        self.reloads: list[str] = []
        self.refuse: str | None = None

    def adapter_version(self, name: str) -> AdapterVersion:
        return self.versions[name]

    def reload_adapter(self, name: str) -> AdapterVersion:
        self.reloads.append(name)
        if self.refuse:
            raise EngineLoadError(self.refuse)
        self.versions[name] = AdapterVersion(name, str(self.paths[name]), adapter_hash(self.paths[name]))
        return self.versions[name]


def reloads(metrics: Metrics, name: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value("diagram_adapter_reloads_total", {"adapter": name, "outcome": outcome})
    return value or 0.0


@pytest.fixture
def adapters(tmp_path):
    paths = {"default": write_adapter(tmp_path / "default", b"a1"), "b": write_adapter(tmp_path / "b", b"b1")}
    engine, metrics = FakeEngine(paths), Metrics()
    return paths, engine, metrics, AdapterWatcher(engine, paths, 30.0, metrics)


def test_unchanged_directories_are_not_reloaded(adapters):
    _, engine, metrics, watcher = adapters
    watcher.check()
    watcher.check()
    assert engine.reloads == []
    assert reloads(metrics, "default", "ok") == reloads(metrics, "default", "failed") == 0


def test_new_content_is_reloaded_once_and_reported(adapters):
    paths, engine, metrics, watcher = adapters
    watcher.check()
    old = engine.versions["b"].hash
    metrics.record_adapter("b", old)
    write_adapter(paths["b"], b"b2-retrained")
    watcher.check()
    watcher.check()
    assert engine.reloads == ["b"]
    assert engine.versions["b"].hash == adapter_hash(paths["b"]) != old
    assert reloads(metrics, "b", "ok") == 1
    info = metrics.registry.get_sample_value
    assert info("diagram_adapter_info", {"adapter": "b", "hash": engine.versions["b"].hash}) == 1
    assert info("diagram_adapter_info", {"adapter": "b", "hash": old}) is None


def test_a_failed_reload_keeps_the_old_adapter_and_waits_for_other_content(adapters, caplog):
    paths, engine, metrics, watcher = adapters
    old = engine.versions["default"]
    engine.refuse = "adapter at /w does not fit Qwen3VLForConditionalGeneration"
    write_adapter(paths["default"], b"broken")
    with caplog.at_level(logging.ERROR, logger="consumer.engine.reload"):
        watcher.check()
    assert engine.versions["default"] == old
    assert reloads(metrics, "default", "failed") == 1
    assert "does not fit" in caplog.text and "still serving" in caplog.text
    (paths["default"] / "adapter_model.safetensors").touch()  # same content, new time: not tried again
    watcher.check()
    assert engine.reloads == ["default"]
    engine.refuse = None
    write_adapter(paths["default"], b"fixed")
    watcher.check()
    assert engine.reloads == ["default", "default"] and engine.versions["default"].hash == adapter_hash(
        paths["default"]
    )
    assert reloads(metrics, "default", "ok") == 1


def test_a_directory_that_cannot_be_read_is_a_failure_never_an_exception(adapters, monkeypatch):
    paths, engine, metrics, watcher = adapters

    def unreadable(path):
        raise PermissionError(f"[Errno 13] Permission denied: '{path}'")

    write_adapter(paths["b"], b"b2")
    monkeypatch.setattr(reload_module, "adapter_hash", unreadable)
    watcher.check()
    assert engine.reloads == [] and reloads(metrics, "b", "failed") == 1


def test_the_thread_polls_at_its_interval_until_stopped(adapters):
    paths, engine, metrics, _ = adapters
    watcher = AdapterWatcher(engine, paths, 0.05, metrics).start()
    try:
        write_adapter(paths["b"], b"b2")
        deadline = time.monotonic() + 5
        while not engine.reloads and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.reloads == ["b"]
    finally:
        watcher.stop()
    assert not watcher._thread.is_alive()
