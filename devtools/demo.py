"""`python -m devtools demo`: the whole service on this machine, end to end, in one command.

Starts a local Apache Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS names one), picks the real model
if it can be loaded and otherwise builds the tiny random one, starts `python -m consumer run` as a
subprocess, produces sample diagram events (inline base64 and file paths, plus one broken event),
and prints the descriptions and dead letters read back from the output topics.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer

from devtools.local_kafka import REPO_ROOT, LocalKafka, create_topics, free_port
from devtools.samples import png_base64, sample_diagram
from devtools.tiny import SECOND_ADAPTER

logger = logging.getLogger(__name__)

DEMO_DIR = REPO_ROOT / ".demo"
REAL_MODEL = "Qwen/Qwen3-VL-2B-Instruct"


def real_model_reachable(model_id: str) -> bool:
    """True if the model is a local directory, already cached, or downloadable right now."""
    if Path(model_id).is_dir():
        return True
    from huggingface_hub import HfApi, snapshot_download

    try:
        snapshot_download(model_id, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001
        pass
    try:
        HfApi().model_info(model_id, timeout=5)
        return True
    except Exception:  # noqa: BLE001
        return False


def choose_model() -> dict[str, str]:
    model_id = os.environ.get("BASE_MODEL_ID", REAL_MODEL)
    if os.environ.get("DEMO_MODEL", "auto") != "tiny" and real_model_reachable(model_id):
        logger.info("demo uses the real model %s", model_id)
        return {"BASE_MODEL_ID": model_id}
    tiny_dir = DEMO_DIR / "tiny-model"
    if not (tiny_dir / SECOND_ADAPTER / "adapter_config.json").exists():
        from devtools.tiny import make_tiny_model

        make_tiny_model(tiny_dir)
    print(
        f"\n*** {model_id} cannot be loaded here (no model hub reachable, nothing cached), so this demo\n"
        "*** runs a TINY RANDOM-WEIGHT Qwen3-VL through the same code: its descriptions are meaningless\n"
        "*** noise. Set BASE_MODEL_ID to a local copy of the real model for real descriptions.\n",
        flush=True,
    )
    return {
        "BASE_MODEL_ID": str(tiny_dir),
        "ADAPTER_PATH": str(tiny_dir / "adapter"),
        "ADAPTERS": f"b={tiny_dir / SECOND_ADAPTER}",  # every other event asks for adapter b
        "MAX_NEW_TOKENS": os.environ.get("MAX_NEW_TOKENS", "48"),
    }


def run_demo(count: int = 6, timeout: float = 600.0) -> int:
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = LocalKafka().start()
        bootstrap = broker.bootstrap_servers
    service = None
    try:
        run_id = uuid.uuid4().hex[:8]
        topics = {
            "input": f"demo-diagrams-{run_id}",
            "output": f"demo-descriptions-{run_id}",
            "dlq": f"demo-dlq-{run_id}",
        }
        create_topics(bootstrap, {topics["input"]: 3, topics["output"]: 3, topics["dlq"]: 1})
        image_root = DEMO_DIR / "images"
        image_root.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **choose_model(),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_GROUP_ID": f"demo-{run_id}",
            "INPUT_TOPIC": topics["input"],
            "OUTPUT_TOPIC": topics["output"],
            "DLQ_TOPIC": topics["dlq"],
            "IMAGE_ROOT": str(image_root),
            "HTTP_PORT": os.environ.get("HTTP_PORT", str(free_port())),
        }
        log_path = DEMO_DIR / "service.log"
        print(
            f"starting the service (logs: {log_path}, health: http://127.0.0.1:{env['HTTP_PORT']}/health)", flush=True
        )
        service = subprocess.Popen(
            [sys.executable, "-m", "consumer", "run"], env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT
        )
        adapters = ["default", "b"] if "ADAPTERS" in env else ["default"]
        expected = produce_samples(bootstrap, topics["input"], image_root, count, adapters)
        return print_results(bootstrap, topics, expected, service, timeout)
    finally:
        if service is not None and service.poll() is None:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(60)
            except subprocess.TimeoutExpired:
                service.kill()
        if broker is not None:
            broker.close()


def produce_samples(bootstrap: str, topic: str, image_root: Path, count: int, adapters: list[str] | None = None) -> int:
    """`count` sample diagrams (by path and inline), each naming one of `adapters` in turn, and a broken one."""
    adapters = adapters or ["default"]
    producer = Producer({"bootstrap.servers": bootstrap})
    for index in range(count):
        image = sample_diagram(index)
        if index % 2:
            name = f"diagram-{index}.png"
            image.save(image_root / name)
            reference = {"path": name}
        else:
            reference = {"base64": png_base64(image)}
        adapter = adapters[index % len(adapters)]
        event = {"id": f"diagram-{index}", "image": reference, "adapter": adapter, "metadata": {"sample": index}}
        producer.produce(topic, key=event["id"], value=json.dumps(event))
    producer.produce(topic, key="broken", value=json.dumps({"id": "broken", "image": {"path": "no-such.png"}}))
    producer.flush(30)
    print(f"produced {count} diagram events and 1 broken one to {topic}", flush=True)
    return count + 1


def print_results(
    bootstrap: str, topics: dict[str, str], expected: int, service: subprocess.Popen, timeout: float
) -> int:
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-reader-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    reader.subscribe([topics["output"], topics["dlq"]])
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while seen < expected and time.monotonic() < deadline:
            if service.poll() is not None:
                print(f"the service exited with status {service.returncode}; see .demo/service.log", flush=True)
                return 1
            message = reader.poll(0.5)
            if message is None or message.error():
                continue
            seen += 1
            if message.topic() == topics["dlq"]:
                headers = {key: value.decode() for key, value in message.headers() or []}
                print(
                    f"\n--- dead letter {message.key().decode()}: [{headers['error.stage']}] {headers['error.message']}"
                )
                continue
            result = json.loads(message.value())
            meta = result["metadata"]
            print(
                f"\n--- {result['id']} ({meta['image_size'][0]}x{meta['image_size'][1]}, {meta['device']}, "
                f"adapter {meta.get('adapter_name')}, "
                f"batch {meta['batch_size']}, {meta['generation_time']:.2f} s, {meta['output_tokens']} tokens)"
            )
            print(result["description"], flush=True)
    finally:
        reader.close()
    print(f"\n{seen}/{expected} events answered", flush=True)
    return 0 if seen == expected else 1
