"""The engine inside the real service: batched results carry honest metadata and the same text as
one-at-a-time generation; a bad adapter stops `python -m consumer run` before it consumes anything."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
from safetensors.torch import load_file, save_file

from consumer.engine.base import GenerationRequest
from consumer.engine.qwen import QwenVLEngine
from consumer.settings import Settings
from devtools.local_kafka import free_port
from devtools.samples import png_bytes, sample_diagram
from tests.support import REPO_ROOT, produce, read_records

SIZES = [(640, 480), (320, 240), (336, 448)]
MAX_NEW_TOKENS = 8  # what ServiceRunner gives the service


@pytest.mark.integration
def test_batched_results_carry_metadata_and_match_single_generation(kafka_bootstrap, topics, service, tiny_model):
    images = {f"diagram-{index}": sample_diagram(index, SIZES[index % len(SIZES)]) for index in range(8)}
    produce(
        kafka_bootstrap,
        topics.input,
        [
            (event_id, json.dumps({"id": event_id, "image": {"base64": base64.b64encode(png_bytes(image)).decode()}}))
            for event_id, image in images.items()
        ],
    )
    # All eight are waiting before the service starts, and the batch window is long: batches fill up.
    # float32 on every CPU: batched text equal to single text is its guarantee (bfloat16: issue 15).
    runner = service(BATCH_SIZE="4", BATCH_MAX_WAIT_MS="3000", TORCH_DTYPE="float32")
    records = read_records(kafka_bootstrap, topics.output, len(images), timeout=120)
    assert len(records) == len(images), runner.log()
    results = {json.loads(record.value())["id"]: json.loads(record.value()) for record in records}

    by_generation_time: dict[float, list[int]] = defaultdict(list)
    for result in results.values():
        meta = result["metadata"]
        assert 1 <= meta["batch_size"] <= 4
        assert 0 < meta["output_tokens"] <= MAX_NEW_TOKENS
        assert 0 < meta["generation_time"] <= meta["inference_time"]
        by_generation_time[meta["generation_time"]].append(meta["batch_size"])
    sizes = Counter(result["metadata"]["batch_size"] for result in results.values())
    assert max(sizes) > 1, sizes
    assert all(count % size == 0 for size, count in sizes.items()), sizes  # whole batches only
    # Members of one batch report the same share of its generate call.
    assert all(len(set(members)) == 1 for members in by_generation_time.values()), by_generation_time

    settings = Settings.from_environ(
        {},
        base_model_id=str(tiny_model),
        adapter_path=tiny_model / "adapter",
        max_new_tokens=MAX_NEW_TOKENS,
        torch_dtype="float32",
    )
    engine = QwenVLEngine(settings)
    engine.load()
    for event_id, image in images.items():
        [alone] = engine.generate([GenerationRequest(image=image, prompt=settings.prompt)]).generations
        assert results[event_id]["description"] == alone.text, event_id
        assert results[event_id]["metadata"]["output_tokens"] == alone.output_tokens, event_id


@pytest.mark.integration
def test_unset_batch_size_is_the_devices_default(kafka_bootstrap, topics, service):
    """Without BATCH_SIZE a replica batches its device's default: 16 images on a CPU (docs/performance.md)."""
    from consumer.engine.device import default_batch_size, resolve_device

    device = resolve_device("auto")
    expected = default_batch_size(device)
    image = base64.b64encode(png_bytes(sample_diagram(0, (320, 240)))).decode()
    produce(
        kafka_bootstrap,
        topics.input,
        [(f"e{index}", json.dumps({"id": f"e{index}", "image": {"base64": image}})) for index in range(20)],
    )
    runner = service(BATCH_MAX_WAIT_MS="3000")
    records = read_records(kafka_bootstrap, topics.output, 20, timeout=120)
    assert len(records) == 20, runner.log()
    sizes = Counter(json.loads(record.value())["metadata"]["batch_size"] for record in records)
    assert max(sizes) == expected, sizes
    assert f"BATCH_SIZE unset: {expected}, the default on {device}" in runner.log()


def test_service_with_an_adapter_that_does_not_fit_exits_3_and_says_why(tiny_model, tmp_path):
    adapter = tmp_path / "adapter-for-another-layout"
    shutil.copytree(tiny_model / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    renamed = {key.replace("model.language_model.layers", "model.layers"): value for key, value in weights.items()}
    save_file(renamed, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("KAFKA_")},
        "BASE_MODEL_ID": str(tiny_model),
        "ADAPTER_PATH": str(adapter),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",  # never contacted: the load fails first
        "HTTP_PORT": str(free_port()),
        "HTTP_HOST": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    log = done.stdout + done.stderr
    assert done.returncode == 3, log
    assert "cannot start" in log and "does not fit Qwen3VLForConditionalGeneration" in log, log
    assert str(adapter) in log
    assert "consuming" not in log  # it never joined the group
