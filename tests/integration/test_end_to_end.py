"""The service end to end: a real subprocess, a real broker, real HTTP, the tiny model."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import threading

import pytest

from devtools.samples import png_bytes, sample_diagram
from tests.support import committed_equals_end, http_get, produce, read_records

pytestmark = pytest.mark.integration

RESULT_METADATA_FIELDS = {
    "inference_time",
    "generation_time",
    "image_size",
    "model",
    "adapter",
    "device",
    "output_tokens",
    "batch_size",
    "source",
}
DLQ_HEADERS = {"error.stage", "error.class", "error.message", "source.topic", "source.partition", "source.offset"}


@pytest.fixture
def image_server(tmp_path):
    """A plain HTTP server on loopback serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_thirty_events_from_three_kinds_of_reference_and_bad_events(
    kafka_bootstrap, topics, service, tmp_path, image_server
):
    www_root, base_url = image_server
    image_root = tmp_path / "images"
    image_root.mkdir()
    records, expected_sizes = [], {}
    for index in range(30):
        size = [(1024, 768), (640, 480), (320, 640)][index % 3]
        data = png_bytes(sample_diagram(index, size))
        event_id = f"event-{index}"
        kind = ("base64", "path", "url")[index % 3]
        if kind == "base64":
            image = {"base64": base64.b64encode(data).decode()}
        elif kind == "path":
            (image_root / f"{event_id}.png").write_bytes(data)
            image = {"path": f"{event_id}.png"}
        else:
            (www_root / f"{event_id}.png").write_bytes(data)
            image = {"url": f"{base_url}/{event_id}.png"}
        event = {"id": event_id, "image": image, "metadata": {"kind": kind, "n": index}}
        records.append((event_id, json.dumps(event)))
        expected_sizes[event_id] = list(size)
        if index in (4, 14, 24):  # bad events among the good ones
            bad = {
                4: ("bad-json", b"{not json"),
                14: ("bad-missing-image", json.dumps({"id": "bad-missing-image"})),
                24: (
                    "bad-not-an-image",
                    json.dumps(
                        {
                            "id": "bad-not-an-image",
                            "image": {"base64": base64.b64encode(b"hello, not a picture").decode()},
                        }
                    ),
                ),
            }[index]
            records.append(bad)
    produce(kafka_bootstrap, topics.input, records)

    runner = service(IMAGE_ROOT=str(image_root), IMAGE_ALLOWED_HOSTS="127.0.0.1", BATCH_SIZE="4")

    results = read_records(kafka_bootstrap, topics.output, 30, timeout=180)
    dead = read_records(kafka_bootstrap, topics.dlq, 3, timeout=30)
    assert len(results) == 30, runner.log()
    by_id = {}
    for message in results:
        result = json.loads(message.value())
        assert message.key().decode() == result["id"]
        by_id[result["id"]] = result
    assert set(by_id) == set(expected_sizes)
    for event_id, result in by_id.items():
        meta = result["metadata"]
        assert RESULT_METADATA_FIELDS <= set(meta), meta
        assert meta["image_size"] == expected_sizes[event_id]
        assert meta["device"] == "cpu" and meta["dtype"] in ("float32", "bfloat16")  # auto: per CPU flavour
        assert meta["adapter"].endswith("adapter")
        assert meta["source"]["topic"] == topics.input
        assert meta["output_tokens"] > 0 and result["description"]
        assert result["input_metadata"]["n"] == int(event_id.split("-")[1])
        # The tiny random model writes noise, not a table: `structured` is there, null, with the reason.
        assert result["structured"] is None, result
        assert result["structured_error"].split(":")[0] in {"no_table", "no_rows", "ragged_rows"}, result

    assert len(dead) == 3, runner.log()
    stages = {}
    for message in dead:
        headers = {key: value.decode() for key, value in message.headers()}
        assert DLQ_HEADERS <= set(headers)
        assert headers["source.topic"] == topics.input
        stages[message.key().decode()] = headers["error.stage"]
        original = [value for key, value in records if key == message.key().decode()][0]
        assert message.value() == (original.encode() if isinstance(original, str) else original)
    assert stages == {"bad-json": "parse", "bad-missing-image": "parse", "bad-not-an-image": "decode"}

    settled, committed, ends = committed_equals_end(kafka_bootstrap, topics.group, topics.input)
    assert settled, f"committed {committed} != end offsets {ends}"

    status, health = runner.health()
    assert status == 200
    assert {"status", "model_loaded", "processor_loaded", "device", "model_load_time", "adapter"} <= set(health)
    assert health["model_loaded"] and health["processor_loaded"] and health["device"] == "cpu"

    status, body = http_get(runner.url + "/metrics")
    text = body.decode()
    assert status == 200
    assert 'diagram_events_total{outcome="ok"} 30.0' in text
    assert 'diagram_events_total{outcome="dead_lettered"} 3.0' in text

    runner.signal()
    assert runner.wait(60) == 0, runner.log()
