"""ADAPTERS end to end: events name their adapter, an unknown one is dead-lettered with the known names,
and an adapter directory given new content is reloaded while the replica runs (a broken one is not).

A real subprocess, a real broker, the tiny model and its two adapters (DIR/adapter, DIR/adapter-b).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from consumer.engine.adapter_hash import adapter_hash
from devtools.samples import png_bytes, sample_diagram
from devtools.tiny import SECOND_ADAPTER
from tests.support import http_get, produce, read_records

pytestmark = pytest.mark.integration

SIZES = [(320, 240), (336, 448), (480, 352)]


def diagram_event(event_id: str, index: int, adapter: str | None) -> tuple[str, str]:
    image = base64.b64encode(png_bytes(sample_diagram(index, SIZES[index % 3]))).decode()
    event: dict = {"id": event_id, "image": {"base64": image}}
    if adapter is not None:
        event["adapter"] = adapter
    return event_id, json.dumps(event)


def results_by_id(records) -> dict[str, dict]:
    return {json.loads(record.value())["id"]: json.loads(record.value()) for record in records}


def test_events_run_on_the_adapter_they_name_and_an_unknown_one_is_dead_lettered(
    kafka_bootstrap, topics, service, tiny_model
):
    runner = service(ADAPTERS=f"b={tiny_model / SECOND_ADAPTER}", BATCH_MAX_WAIT_MS="1000", BATCH_SIZE="16")
    mixed = []
    for index in range(3):
        mixed += [diagram_event(f"{index}-none", index, None), diagram_event(f"{index}-default", index, "default")]
        mixed += [diagram_event(f"{index}-b", index, "b")]
    mixed.append(diagram_event("unknown", 0, "uml"))
    produce(kafka_bootstrap, topics.input, mixed, partition=0)
    results = results_by_id(read_records(kafka_bootstrap, topics.output, 9))
    (dead,) = read_records(kafka_bootstrap, topics.dlq, 1)
    assert len(results) == 9, runner.log()

    headers = {name: value.decode() for name, value in dead.headers()}
    assert (headers["error.stage"], headers["error.reason"], headers["event.id"]) == (
        "parse",
        "unknown_adapter",
        "unknown",
    )
    assert "'uml'" in headers["error.message"] and "default, b" in headers["error.message"]

    paths = {"default": tiny_model / "adapter", "b": tiny_model / SECOND_ADAPTER}
    for event_id, result in results.items():
        name = event_id.split("-")[1].replace("none", "default")
        metadata = result["metadata"]
        assert metadata["adapter_name"] == name
        assert metadata["adapter"] == str(paths[name])  # still the path, as before
        assert metadata["adapter_hash"] == adapter_hash(paths[name])
    # Batches hold one adapter each (consumer/stages/infer.py): the six `default` events went together.
    assert max(results[f"{i}-{kind}"]["metadata"]["batch_size"] for i in range(3) for kind in ("none", "default")) >= 4
    for index in range(3):
        assert results[f"{index}-none"]["description"] == results[f"{index}-default"]["description"]
    assert sum(results[f"{i}-b"]["description"] != results[f"{i}-default"]["description"] for i in range(3)) >= 2

    # The same images again, alone in their batch: the same texts.
    produce(kafka_bootstrap, topics.input, [diagram_event(f"{index}-b-alone", index, "b") for index in range(3)], 0)
    alone = results_by_id(read_records(kafka_bootstrap, topics.output, 12))
    for index in range(3):
        assert alone[f"{index}-b-alone"]["description"] == results[f"{index}-b"]["description"]


def reload_count(runner, outcome: str) -> float:
    _, body = http_get(runner.url + "/metrics")
    pattern = rf'^diagram_adapter_reloads_total\{{adapter="b",outcome="{outcome}"\}} (\S+)$'
    match = re.search(pattern, body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def put_in_place(source: Path, directory: Path) -> None:
    """Replace the adapter in `directory` by `source`'s, file by file, each rename atomic."""
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        staged = directory / f".{name}.new"
        shutil.copyfile(source / name, staged)
        os.replace(staged, directory / name)


def test_new_content_is_reloaded_and_broken_content_keeps_the_old_adapter(
    kafka_bootstrap, topics, service, tiny_model, tmp_path
):
    second = tmp_path / "b"
    shutil.copytree(tiny_model / SECOND_ADAPTER, second)
    runner = service(ADAPTERS=f"b={second}", ADAPTER_POLL_SECONDS="0.5")
    produce(kafka_bootstrap, topics.input, [diagram_event("first", 0, "b"), diagram_event("default", 0, None)], 0)
    before = results_by_id(read_records(kafka_bootstrap, topics.output, 2))
    assert before["first"]["metadata"]["adapter_hash"] == adapter_hash(tiny_model / SECOND_ADAPTER)

    put_in_place(tiny_model / "adapter", second)
    new_hash = adapter_hash(tiny_model / "adapter")
    deadline, sent, reloaded = time.monotonic() + 60, 2, None
    while reloaded is None and time.monotonic() < deadline:
        produce(kafka_bootstrap, topics.input, [diagram_event(f"after-{sent}", 0, "b")], 0)
        sent += 1
        latest = results_by_id(read_records(kafka_bootstrap, topics.output, sent))[f"after-{sent - 1}"]
        if latest["metadata"]["adapter_hash"] == new_hash:
            reloaded = latest
        time.sleep(0.5)
    assert reloaded is not None, runner.log()
    # b now holds the default adapter's weights: the default's text, under b's name.
    assert reloaded["description"] == before["default"]["description"]
    assert reloaded["metadata"]["adapter_name"] == "b" and reload_count(runner, "ok") >= 1

    weights = load_file(tiny_model / SECOND_ADAPTER / "adapter_model.safetensors")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model / SECOND_ADAPTER, broken)
    fewer = {key: tensor for key, tensor in weights.items() if ".layers.1." not in key}
    save_file(fewer, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    put_in_place(broken, second)
    deadline = time.monotonic() + 30
    while reload_count(runner, "failed") < 1 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert reload_count(runner, "failed") >= 1, runner.log()
    assert "does not fit" in runner.full_log()

    produce(kafka_bootstrap, topics.input, [diagram_event("after-broken", 0, "b")], 0)
    kept = results_by_id(read_records(kafka_bootstrap, topics.output, sent + 1))["after-broken"]
    assert kept["metadata"]["adapter_hash"] == new_hash and kept["description"] == reloaded["description"]
    assert runner.process.poll() is None and runner.health()[0] == 200
