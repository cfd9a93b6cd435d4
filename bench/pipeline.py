"""Pipeline throughput without a model: the service (ENGINE=echo) against plain confluent-kafka loops.

    python -m bench.pipeline            # the full run: about 5 minutes on 2 cores
    python -m bench.pipeline --quick    # a smoke run: about a minute

Everything runs in one go against one broker (KAFKA_BOOTSTRAP_SERVERS if set, else a local Kafka
from the project's jars). Three kinds of event, each on its own 6-partition topic:

- base64: a 1024x768 PNG diagram inline (devtools.samples, ~15 KB of JSON);
- url:    the same images as http URLs served from memory by a ThreadingHTTPServer on loopback;
- small:  a 64x48 PNG inline: next to no image work, so what is left is the pipeline's own cost.

For each kind, in order, on the same events:

1. raw, Kafka only: a plain loop in this process that polls a record and produces a fixed result
   of the service's result size under its key, committing (synchronously, every 0.5 s) only offsets
   whose result the broker acknowledged: the service's commit policy, with its client settings;
2. raw + decode: the same loop, which also parses the event and resolves its image with the
   service's own `ImageResolver` (fetch, base64, PNG decode) before producing, one at a time;
3. the service: `python -m consumer run` with ENGINE=echo as a subprocess, one process.

Each raw-Kafka and service run is followed by a latency phase: events produced at a steady rate
(20/s, or a quarter of the throughput just measured if lower) while the consumer runs; the latency
added per event is the result record's timestamp minus the input record's.

Throughput is (results - 1) / (last result timestamp - first result timestamp), both set by the
producer when it produces, so start-up and group joining are left out. CPU time per event comes
from /proc: this process for the raw loops, the service process, and the broker when this script
started it. Where the time goes per batch comes from the service's own histograms
(`diagram_stage_duration_seconds`, `diagram_batch_size`), scraped from /metrics before and after
the run and diffed. Scaling: 1, 2 and 3 service processes in one group on a 6-partition topic,
all joined before the events are produced.

`--tracing` turns the service's tracing on (OTEL_TRACES_EXPORTER=otlp) and points it at an OTLP/HTTP
sink on loopback in this process, which accepts and counts the exports without decoding them.

Tables are printed; the figures go to bench/results/pipeline.json (`ratio_vs_raw`: service over
raw + decode, base64 events) and a chart to bench/results/pipeline_stages.png.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/pipeline.py` must use this checkout's `consumer`
    sys.path.insert(0, str(REPO_ROOT))

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition  # noqa: E402

from consumer.events import parse_event  # noqa: E402
from consumer.images import ImageResolver  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from devtools.local_kafka import LocalKafka, create_topics, free_port  # noqa: E402
from devtools.samples import png_bytes, sample_diagram  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
PARTITIONS = 6
DISTINCT_IMAGES = 8
COMMIT_INTERVAL_S = 0.5  # the service's (consumer.pipeline.COMMIT_INTERVAL_S)
STAGE_METRIC = "diagram_stage_duration_seconds"
STAGE_ORDER = ["fetch", "decode", "prepare", "preprocess", "generate", "publish"]


@dataclass(frozen=True)
class Profile:
    """How much work each part of the run does."""

    events: int  # per kind: what the raw-Kafka loop and the service consume
    decode_events: int  # of those, how many the raw + decode loop handles (it is slow)
    scaling_events: int
    scaling: tuple[int, ...]
    latency_rate: float  # events/s at most
    latency_seconds: float


FULL = Profile(
    events=1500, decode_events=500, scaling_events=1200, scaling=(1, 2, 3), latency_rate=20, latency_seconds=8
)
QUICK = Profile(events=300, decode_events=150, scaling_events=300, scaling=(1, 2), latency_rate=20, latency_seconds=3)


@dataclass(frozen=True)
class Kind:
    name: str
    image_size: tuple[int, int]
    reference: str  # "base64" or "url"
    label: str


KINDS = [
    Kind("base64", (1024, 768), "base64", "1024x768 PNG inline (base64)"),
    Kind("url", (1024, 768), "url", "1024x768 PNG by URL (loopback HTTP)"),
    Kind("small", (64, 48), "base64", "64x48 PNG inline (image work ~0)"),
]


# -- inputs ------------------------------------------------------------------------------------------
class ImageServer:
    """A ThreadingHTTPServer on loopback serving PNGs from memory at /<size>/<index>.png."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}
        images = self.images

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                body = images.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="image-server", daemon=True)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class OtlpSink:
    """An OTLP/HTTP traces endpoint on loopback (`--tracing`): answers 200 to every export, counts
    requests and bytes, decodes nothing (so it costs this process little)."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.requests += 1
                sink.bytes += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-sink", daemon=True)

    def __enter__(self) -> OtlpSink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self) -> dict[str, str]:
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint}


@dataclass
class Corpus:
    """DISTINCT_IMAGES sample diagrams per size; events cycle through them."""

    server: ImageServer
    pngs: dict[tuple[int, int], list[bytes]] = field(default_factory=dict)

    def images(self, size: tuple[int, int]) -> list[bytes]:
        if size not in self.pngs:
            # sample_diagram lays out for 1024x768; smaller sizes are that drawing scaled down.
            self.pngs[size] = [png_bytes(sample_diagram(i).resize(size)) for i in range(DISTINCT_IMAGES)]
            for index, data in enumerate(self.pngs[size]):
                self.server.images[f"/{size[0]}x{size[1]}/{index}.png"] = data
        return self.pngs[size]

    def events(self, kind: Kind, count: int, prefix: str) -> list[tuple[str, bytes]]:
        images = self.images(kind.image_size)
        if kind.reference == "base64":
            refs = [{"base64": base64.b64encode(image).decode()} for image in images]
        else:
            width, height = kind.image_size
            refs = [{"url": f"{self.server.base_url}/{width}x{height}/{i}.png"} for i in range(len(images))]
        return [
            (f"{prefix}-{i}", json.dumps({"id": f"{prefix}-{i}", "image": refs[i % len(refs)]}).encode())
            for i in range(count)
        ]


def sample_result() -> bytes:
    """What the service publishes for one of these events with ENGINE=echo (the raw loops' result size)."""
    from consumer.engine.echo import ECHO_DESCRIPTION
    from consumer.events import DiagramResult, ResultMetadata, Source

    return (
        DiagramResult(
            id="base64-1234",
            description=ECHO_DESCRIPTION,
            metadata=ResultMetadata(
                inference_time=0.0123,
                generation_time=0.0001,
                image_size=(1024, 768),
                model="echo",
                adapter=None,
                device="cpu",
                output_tokens=0,
                batch_size=8,
                source=Source(topic="bench-0123ab-base64-in", partition=3, offset=1234),
            ),
        )
        .model_dump_json()
        .encode()
    )


def produce(bootstrap: str, topic: str, records: list[tuple[str, bytes]], rate: float | None = None) -> dict[str, int]:
    """Produce `records` (all at once, or `rate` per second); returns each key's record timestamp (ms)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    timestamps: dict[str, int] = {}
    failures: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, record: Message) -> None:
        if error is not None:
            failures.append(error)
        else:
            timestamps[record.key().decode()] = record.timestamp()[1]

    started = time.monotonic()
    for index, (key, value) in enumerate(records):
        if rate:
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                producer.poll(delay)
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60) != 0 or failures:
        raise RuntimeError(f"bench producer could not deliver every event: {failures[:1]}")
    return timestamps


# -- reading results back -----------------------------------------------------------------------------
def topic_end_total(probe: Consumer, topic: str) -> int:
    partitions = probe.list_topics(topic, timeout=10).topics[topic].partitions
    return sum(probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)


def count_records(bootstrap: str, topics: list[str], count: int = 0, timeout: float = 0) -> int:
    """Records in `topics`, once they hold `count` between them or `timeout` passed (watermarks only)."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-probe-{uuid.uuid4().hex}"})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                total = sum(topic_end_total(probe, topic) for topic in topics)
            except KafkaException:  # a topic created a moment ago may have no leader yet
                total = -1
            if total >= count or (total >= 0 and time.monotonic() > deadline):
                return total
            if time.monotonic() > deadline + 30:
                raise RuntimeError(f"cannot read the end offsets of {topics}")
            time.sleep(0.25)
    finally:
        probe.close()


def read_all(bootstrap: str, topic: str) -> list[tuple[str, int]]:
    """Every record of `topic` as (key, timestamp ms)."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
    reader.assign([TopicPartition(topic, p, 0) for p in partitions])
    records: list[tuple[str, int]] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            for message in reader.consume(1000, 0.5):
                if message.error():
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(message.partition())
                    continue
                records.append(((message.key() or b"").decode(), message.timestamp()[1]))
    finally:
        reader.close()
    return records


def rate_from_timestamps(timestamps: list[int]) -> float:
    """Results per second over the span of their record timestamps."""
    if len(timestamps) < 2:
        return 0.0
    span_ms = max(timestamps) - min(timestamps)
    return (len(timestamps) - 1) / max(span_ms / 1000, 0.001)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)
    return ordered[index]


def latency_ms(inputs: dict[str, int], results: list[tuple[str, int]], rate: float) -> dict[str, float | None]:
    """Result record timestamp minus input record timestamp, for the events in `inputs`."""
    delays = [ts - inputs[key] for key, ts in results if key in inputs]
    if not delays:
        return {"events": 0, "rate": rate, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {
        "events": len(delays),
        "rate": round(rate, 1),
        "p50_ms": percentile(delays, 50),
        "p99_ms": percentile(delays, 99),
        "mean_ms": round(statistics.fmean(delays), 1),
    }


# -- CPU accounting -----------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all threads, from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CpuMeter:
    """CPU seconds spent by some processes between `start` and `stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, float | None] = {}

    def start(self) -> CpuMeter:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float | None]:
        spent: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            after, before = cpu_seconds(pid), self.before.get(name)
            spent[name] = None if after is None or before is None else after - before
        return spent


def per_event_ms(seconds: float | None, events: int) -> float | None:
    return None if seconds is None else round(seconds * 1000 / max(events, 1), 3)


# -- the raw loops ------------------------------------------------------------------------------------
class RawLoop:
    """A plain poll -> produce loop with the service's commit policy, in a thread of this process.

    For each input record it produces a fixed result of the service's result size under the input's
    key; an input offset is committed (synchronously, every COMMIT_INTERVAL_S) only once every result
    up to it was acknowledged. With `resolver`, it first parses the event and resolves its image
    (fetch or base64, decode) with the service's own code. It stops taking records after `limit`.
    """

    def __init__(
        self, settings: Settings, topic: str, output_topic: str, limit: int, resolver: ImageResolver | None
    ) -> None:
        self.consumer = Consumer(settings.consumer_config())
        self.producer = Producer(settings.producer_config())
        self.topic, self.output_topic, self.limit, self.resolver = topic, output_topic, limit, resolver
        result_bytes = len(sample_result())
        self.result = b'{"id":"raw","description":"' + b"x" * max(result_bytes - 30, 0) + b'"}'
        self.taken = 0
        self.pending: dict[int, set[int]] = {}
        self.next_offset: dict[int, int] = {}
        self.committed: dict[int, int] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="raw-loop", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> RawLoop:
        self.consumer.subscribe([self.topic])
        self.thread.start()
        return self

    def _on_delivery(self, partition: int, offset: int) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(error: KafkaError | None, _record: Message) -> None:
            if error is not None:
                self.error = RuntimeError(f"raw loop publish failed: {error}")
                return
            self.pending[partition].discard(offset)

        return on_delivery

    def _commit(self) -> None:
        offsets = []
        for partition, next_offset in self.next_offset.items():
            pending = self.pending[partition]
            point = min(pending) if pending else next_offset
            if point > self.committed.get(partition, -1):
                offsets.append(TopicPartition(self.topic, partition, point))
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            for tp in offsets:
                self.committed[tp.partition] = tp.offset

    def _run(self) -> None:
        last_commit = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self.producer.poll(0)
                message = self.consumer.poll(0.2) if self.taken < self.limit else None
                if message is not None and not message.error():
                    self.taken += 1
                    if self.resolver is not None:
                        self.resolver.resolve(parse_event(message.value()).image)
                    partition, offset = message.partition(), message.offset()
                    self.pending.setdefault(partition, set()).add(offset)
                    self.next_offset[partition] = offset + 1
                    self.producer.produce(
                        self.output_topic,
                        value=self.result,
                        key=message.key(),
                        on_delivery=self._on_delivery(partition, offset),
                    )
                elif self.taken >= self.limit:
                    self.producer.poll(0.05)
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    last_commit = time.monotonic()
                    self._commit()
            self.producer.flush(30)
            self._commit()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        if self.error is not None:
            raise RuntimeError(f"raw loop failed: {self.error}")


# -- the service --------------------------------------------------------------------------------------
class Service:
    """`python -m consumer run` with ENGINE=echo, as a subprocess; its log goes to a file."""

    def __init__(
        self, bootstrap: str, group: str, topics: tuple[str, str, str], workdir: Path, extra_env: dict[str, str]
    ) -> None:
        self.port = free_port()
        self.log_path = workdir / f"service-{group}-{self.port}.log"
        input_topic, output_topic, dlq_topic = topics
        self.env = {
            # KAFKA_* of this shell (KAFKA_LIBS_DIR, say) would become librdkafka properties.
            **{k: v for k, v in os.environ.items() if not k.upper().startswith("KAFKA_")},
            "ENGINE": "echo",
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_GROUP_ID": group,
            "INPUT_TOPIC": input_topic,
            "OUTPUT_TOPIC": output_topic,
            "DLQ_TOPIC": dlq_topic,
            "HTTP_PORT": str(self.port),
            "HTTP_HOST": "127.0.0.1",
            "IMAGE_ALLOWED_HOSTS": "127.0.0.1",
            **extra_env,
        }
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Service:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumer", "run"],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read() or b"{}")
        except (OSError, ValueError):
            return None

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return response.read().decode()

    def first_scrape(self, timeout: float = 120) -> dict[str, dict[str, float]]:
        """The stage histograms as soon as /metrics answers (before the group is joined)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                return scrape_stages(self.metrics_text())
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"service /metrics did not answer within {timeout} s; log {self.log_path}")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"service exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_assigned(services: list[Service], partitions: int, timeout: float = 90.0) -> None:
    """Wait until the group's members hold all `partitions` between them, each at least one."""
    deadline = time.monotonic() + timeout
    stable_since: float | None = None
    while time.monotonic() < deadline:
        for service in services:
            service.check_alive()
        counts = [len((service.health() or {}).get("assigned_partitions") or []) for service in services]
        if sum(counts) == partitions and all(counts):
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= 1.0:  # no rebalance still under way
                return
        else:
            stable_since = None
        time.sleep(0.3)
    raise RuntimeError(f"services did not share {partitions} partitions within {timeout} s")


def scrape_stages(text: str) -> dict[str, dict[str, float]]:
    """{stage: {"sum": s, "count": n}} of the stage histogram, plus "_batches" from diagram_batch_size."""
    stages: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        for suffix in ("_sum", "_count"):
            if name.startswith(STAGE_METRIC + suffix + "{"):
                stage = name.split('stage="', 1)[1].split('"', 1)[0]
                stages.setdefault(stage, {"sum": 0.0, "count": 0.0})[suffix[1:]] = float(value)
            elif name == "diagram_batch_size" + suffix:
                stages.setdefault("_batches", {"sum": 0.0, "count": 0.0})[suffix[1:]] = float(value)
        if name == 'diagram_events_total{outcome="retried"}':  # fetches retried after a transient failure
            stages["_retried"] = {"sum": 0.0, "count": float(value)}
    return stages


def diff_stages(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        stage: {key: after[stage][key] - before.get(stage, {}).get(key, 0.0) for key in ("sum", "count")}
        for stage in after
    }


def stage_table(stages: dict[str, dict[str, float]], events_per_s: float) -> dict:
    """Per stage: observations, mean ms, and ms per batch (its sum / batches), plus the batch's wall time.

    end_to_end is left out: on a backlog it measures how long events waited on the topic.
    """
    batches = stages.get("_batches", {"sum": 0.0, "count": 0.0})
    count = batches["count"] or 1
    mean_batch = batches["sum"] / count
    names = [s for s in stages if not s.startswith("_") and s != "end_to_end" and stages[s]["count"]]
    names.sort(key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))
    rows = [
        {
            "stage": stage,
            "observations": int(stages[stage]["count"]),
            "mean_ms": round(stages[stage]["sum"] / stages[stage]["count"] * 1000, 3),
            "ms_per_batch": round(stages[stage]["sum"] / count * 1000, 3),
        }
        for stage in names
    ]
    return {
        "fetches_retried": int(stages.get("_retried", {}).get("count", 0)),
        "batches": int(batches["count"]),
        "mean_batch_size": round(mean_batch, 2),
        "batch_wall_ms": round(1000 * mean_batch / events_per_s, 2) if events_per_s else None,
        "rows": rows,
    }


# -- the runs -----------------------------------------------------------------------------------------
@dataclass
class Bench:
    bootstrap: str
    profile: Profile
    workdir: Path
    extra_env: dict[str, str]
    broker_pid: int | None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def topic(self, name: str, partitions: int = PARTITIONS) -> str:
        full = f"bench-{self.run_id}-{name}"
        for attempt in range(3):
            try:
                create_topics(self.bootstrap, {full: partitions})
                return full
            except TimeoutError:  # seen on a freshly started broker on a busy machine; it answers later
                print(f"creating topic {full} timed out (attempt {attempt + 1})", flush=True)
        raise RuntimeError(f"cannot create topic {full}")

    def settings(self, group: str) -> Settings:
        return Settings.from_environ(
            {
                **self.extra_env,
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "KAFKA_GROUP_ID": group,
                "IMAGE_ALLOWED_HOSTS": "127.0.0.1",
            }
        )

    def meter(self, **pids: int) -> CpuMeter:
        if self.broker_pid:
            pids["broker"] = self.broker_pid
        return CpuMeter(pids).start()

    def latency_phase(
        self, input_topic: str, events: list[tuple[str, bytes]], throughput: float
    ) -> tuple[dict[str, int], float]:
        """Produce `events` at a steady rate: profile.latency_rate, or a quarter of `throughput` if lower.

        A light load, so the figure is the latency the pipeline adds rather than time spent queueing.
        """
        rate = min(self.profile.latency_rate, max(throughput / 4, 1.0))
        count = max(int(rate * self.profile.latency_seconds), 10)
        return produce(self.bootstrap, input_topic, events[:count], rate=rate), rate

    def raw(
        self, name: str, input_topic: str, limit: int, decode: bool, latency_events: list[tuple[str, bytes]] | None
    ) -> dict:
        """A raw loop over the first `limit` records on `input_topic`, then the latency phase."""
        target = min(limit, count_records(self.bootstrap, [input_topic]))
        output = self.topic(f"{name}-out")
        settings = self.settings(f"{name}-{uuid.uuid4().hex[:6]}")
        loop = RawLoop(settings, input_topic, output, target, ImageResolver(settings) if decode else None)
        meter = self.meter(raw=os.getpid())
        started = time.monotonic()
        loop.start()
        inputs, rate = {}, 0.0
        try:
            if count_records(self.bootstrap, [output], target, timeout=600) < target:
                raise RuntimeError(f"{name}: raw loop did not finish {target} events within 600 s")
            cpu = meter.stop()
            if latency_events:
                loop.limit += len(latency_events)
                inputs, rate = self.latency_phase(input_topic, latency_events, target / (time.monotonic() - started))
                count_records(self.bootstrap, [output], target + len(inputs), timeout=60)
        finally:
            loop.stop()
        return self._summary(read_all(self.bootstrap, output), inputs, rate, cpu, "raw")

    def service(self, name: str, input_topic: str, latency_events: list[tuple[str, bytes]]) -> dict:
        """One service process over everything on `input_topic`, then the latency phase."""
        backlog = count_records(self.bootstrap, [input_topic])
        output, dlq = self.topic(f"{name}-out"), self.topic(f"{name}-dlq", 1)
        group = f"{name}-{uuid.uuid4().hex[:6]}"
        service = Service(self.bootstrap, group, (input_topic, output, dlq), self.workdir, self.extra_env)
        try:
            service.start()
            # The events are waiting already: the service starts on them as soon as it joins, which
            # is after /metrics first answers.
            before = service.first_scrape()
            meter = self.meter(service=service.pid)
            started = time.monotonic()
            done = count_records(self.bootstrap, [output, dlq], backlog, timeout=600)
            service.check_alive()
            if done < backlog:
                raise RuntimeError(
                    f"{name}: service published {done} of {backlog} within 600 s; log {service.log_path}"
                )
            cpu = meter.stop()
            after = scrape_stages(service.metrics_text())
            inputs, rate = self.latency_phase(input_topic, latency_events, backlog / (time.monotonic() - started))
            count_records(self.bootstrap, [output, dlq], backlog + len(inputs), timeout=60)
        finally:
            service.stop()
        summary = self._summary(read_all(self.bootstrap, output), inputs, rate, cpu, "service")
        summary["dead_letters"] = count_records(self.bootstrap, [dlq])
        summary["stages"] = stage_table(diff_stages(before, after), summary["events_per_s"])
        return summary

    def _summary(
        self, results: list[tuple[str, int]], inputs: dict[str, int], rate: float, cpu: dict, own: str
    ) -> dict:
        throughput = [ts for key, ts in results if key not in inputs]
        return {
            "events": len(throughput),
            "events_per_s": round(rate_from_timestamps(throughput), 1),
            "cpu_ms_per_event": per_event_ms(cpu.get(own), len(throughput)),
            "broker_cpu_ms_per_event": per_event_ms(cpu.get("broker"), len(throughput)),
            "latency": latency_ms(inputs, results, rate) if inputs else None,
        }

    def scaling(self, corpus: Corpus, processes: int) -> dict:
        count = self.profile.scaling_events
        input_topic = self.topic(f"scale{processes}-in")
        output, dlq = self.topic(f"scale{processes}-out"), self.topic(f"scale{processes}-dlq", 1)
        group = f"scale{processes}-{uuid.uuid4().hex[:6]}"
        services = [
            Service(self.bootstrap, group, (input_topic, output, dlq), self.workdir, self.extra_env)
            for _ in range(processes)
        ]
        events = corpus.events(KINDS[0], count, f"scale{processes}")
        try:
            for service in services:
                service.start()
            wait_assigned(services, PARTITIONS)
            meter = self.meter(**{f"service{i}": service.pid for i, service in enumerate(services)})
            produce_started = time.monotonic()
            produce(self.bootstrap, input_topic, events)
            produce_seconds = time.monotonic() - produce_started
            done = count_records(self.bootstrap, [output, dlq], count, timeout=600)
            for service in services:
                service.check_alive()
            if done < count:
                raise RuntimeError(f"{processes} services published {done} of {count} within 600 s")
            cpu = meter.stop()
        finally:
            for service in services:
                service.stop()
        results = read_all(self.bootstrap, output)
        service_cpu = [v for k, v in cpu.items() if k.startswith("service") and v is not None]
        return {
            "processes": processes,
            "events": len(results),
            "events_per_s": round(rate_from_timestamps([ts for _, ts in results]), 1),
            "bench_producer_events_per_s": round(count / produce_seconds, 1),
            "service_cpu_ms_per_event": per_event_ms(sum(service_cpu) if service_cpu else None, len(results)),
            "broker_cpu_ms_per_event": per_event_ms(cpu.get("broker"), len(results)),
        }


# -- reporting ----------------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [["-" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |" for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def build_report(
    runs: dict[str, dict],
    kinds: list[Kind],
    scaling: list[dict],
    profile: Profile,
    corpus: Corpus,
    command: str,
    started: float,
    load_before: tuple[float, ...],
    extra_env: dict[str, str],
) -> dict:
    def rate(loop: str, kind: Kind) -> float:
        return runs[f"{loop}_{kind.name}"]["events_per_s"]

    ratios = {
        kind.name: {
            "service_vs_raw_decode": ratio(rate("service", kind), rate("raw_decode", kind)),
            "service_vs_raw_kafka": ratio(rate("service", kind), rate("raw_kafka", kind)),
        }
        for kind in kinds
    }
    base64_event = corpus.events(KINDS[0], DISTINCT_IMAGES, "x")
    return {
        "command": command,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "note": "every figure drops when other work shares the machine: see machine.load_average_*",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "settings": extra_env,
        "events_per_run": profile.events,
        "raw_decode_events": profile.decode_events,
        "event_bytes_base64_1024x768": round(statistics.fmean(len(v) for _, v in base64_event)),
        "png_bytes_1024x768": round(statistics.fmean(len(p) for p in corpus.images(KINDS[0].image_size))),
        # service / (raw loop with decoding included), base64 1024x768 events: the target >= 0.7
        "ratio_vs_raw": ratios.get("base64", {}).get("service_vs_raw_decode"),
        # service / Kafka-only raw loop: what a PNG decode costs next to a consume + produce
        "ratio_vs_raw_kafka_only": ratios.get("base64", {}).get("service_vs_raw_kafka"),
        "ratios": ratios,
        "kinds": {kind.name: kind.label for kind in kinds},
        "runs": runs,
        "scaling": scaling,
    }


def print_report(report: dict) -> None:
    runs = report["runs"]
    print(
        f"\n## Throughput ({report['events_per_run']} events per run, raw + decode {report['raw_decode_events']}; "
        f"base64 events {report['event_bytes_base64_1024x768']} B)\n"
    )
    rows = []
    for kind, label in report["kinds"].items():
        for loop in ("raw_kafka", "raw_decode", "service"):
            run = runs[f"{loop}_{kind}"]
            latency = run["latency"] or {}
            rows.append(
                [
                    label,
                    {"raw_kafka": "raw, Kafka only", "raw_decode": "raw + decode", "service": "service (echo)"}[loop],
                    run["events_per_s"],
                    report["ratios"][kind]["service_vs_raw_decode"] if loop == "service" else "",
                    report["ratios"][kind]["service_vs_raw_kafka"] if loop == "service" else "",
                    run["cpu_ms_per_event"],
                    run["broker_cpu_ms_per_event"],
                    latency.get("p50_ms", ""),
                    latency.get("p99_ms", ""),
                    latency.get("rate", ""),
                ]
            )
    print(
        table(
            [
                "events",
                "loop",
                "events/s",
                "vs raw+decode",
                "vs raw Kafka",
                "CPU ms/event",
                "broker CPU ms/event",
                "latency p50 ms",
                "latency p99 ms",
                "at events/s",
            ],
            rows,
        )
    )
    for kind, label in report["kinds"].items():
        stages = runs[f"service_{kind}"]["stages"]
        print(
            f"\n## Where the time goes: service, {label}: {stages['batches']} batches of {stages['mean_batch_size']} "
            f"events on average, {stages['batch_wall_ms']} ms of wall time per batch, "
            f"{stages['fetches_retried']} fetches retried\n"
        )
        print(
            table(
                ["stage", "observations", "mean ms", "ms per batch"],
                [[r["stage"], r["observations"], r["mean_ms"], r["ms_per_batch"]] for r in stages["rows"]],
            )
        )
    print(
        "\n(ms per batch: the stage's sum over a batch's events; fetch/decode run on FETCH_WORKERS threads and "
        "publish waits for the broker's ack asynchronously, so those overlap other batches)"
    )
    if report["scaling"]:
        print(
            f"\n## Scaling: service processes in one group, {PARTITIONS} partitions, base64 1024x768 events, "
            f"{report['machine']['cpus']} CPUs\n"
        )
        print(
            table(
                ["processes", "events/s", "service CPU ms/event", "broker CPU ms/event", "bench producer events/s"],
                [
                    [
                        s["processes"],
                        s["events_per_s"],
                        s["service_cpu_ms_per_event"],
                        s["broker_cpu_ms_per_event"],
                        s["bench_producer_events_per_s"],
                    ]
                    for s in report["scaling"]
                ],
            )
        )
    print(
        f"\nratio_vs_raw (service / raw + decode, base64) = {report['ratio_vs_raw']}; "
        f"service / raw Kafka only = {report['ratio_vs_raw_kafka_only']}; "
        f"load average before {report['machine']['load_average_before']}, "
        f"after {report['machine']['load_average_after']}"
    )


def chart(report: dict, path: Path) -> None:
    """One panel per kind of event: each stage's milliseconds per batch next to the batch's wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(report["kinds"].items())
    figure, axes = plt.subplots(len(kinds), 1, figsize=(8, 2.4 * len(kinds) + 0.6), squeeze=False)
    for axis, (kind, label) in zip(axes[:, 0], kinds, strict=False):
        stages = report["runs"][f"service_{kind}"]["stages"]
        labels = [row["stage"] for row in stages["rows"]] + ["batch wall time"]
        values = [row["ms_per_batch"] for row in stages["rows"]] + [stages["batch_wall_ms"] or 0]
        colors = ["#4c72b0"] * len(stages["rows"]) + ["#999999"]
        bars = axis.barh(labels[::-1], values[::-1], color=colors[::-1])
        axis.bar_label(bars, fmt="%.1f ms", padding=3)
        axis.set_title(f"{label}: {stages['mean_batch_size']} events per batch", fontsize=10)
        axis.margins(x=0.25)
    axes[-1, 0].set_xlabel(
        "ms per batch: each stage summed over the batch's events. fetch and decode run on\n"
        "FETCH_WORKERS threads, and publish (produce -> broker ack) is asynchronous: they overlap\n"
        "other batches, so their sums can exceed the batch's wall time (batch size / throughput)",
        fontsize=9,
    )
    figure.suptitle(f"Service with ENGINE=echo: where one batch's time goes ({report['when']})", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few events, scaling to 2 processes")
    parser.add_argument("--events", type=int, help=f"events per kind (default {FULL.events}, quick {QUICK.events})")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the service and the raw loops' clients, e.g. LOG_LEVEL=WARNING",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "pipeline.json")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument(
        "--tracing", action="store_true", help="the service traces every event, exporting to an OTLP sink on loopback"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(kind.name for kind in KINDS),
        help="which kinds of event to run (the report needs base64)",
    )
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.events:
        profile = Profile(
            args.events,
            min(args.events, profile.decode_events),
            args.events,
            profile.scaling,
            profile.latency_rate,
            profile.latency_seconds,
        )
    extra_env = dict(item.split("=", 1) for item in args.env)
    kinds = [kind for kind in KINDS if kind.name in args.kinds.split(",")]
    command = " ".join(["python -m bench.pipeline", *(sys.argv[1:] if argv is None else argv)])
    started, load_before = time.time(), os.getloadavg()
    # SIGTERM unwinds like Ctrl-C, so the broker and the services this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pipeline-")))
        bootstrap, broker_pid = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), None
        if not bootstrap:
            broker = stack.enter_context(LocalKafka())
            bootstrap, broker_pid = broker.bootstrap_servers, broker.process.pid
        print(f"broker {bootstrap}; {profile.events} events per kind; service logs in {workdir}", flush=True)
        bench = Bench(bootstrap, profile, workdir, extra_env, broker_pid)
        corpus = Corpus(stack.enter_context(ImageServer()))
        sink = stack.enter_context(OtlpSink()) if args.tracing else None
        if sink is not None:
            extra_env = {**extra_env, **sink.env()}
            bench.extra_env = extra_env
        latency_count = int(profile.latency_rate * profile.latency_seconds)

        runs: dict[str, dict] = {}
        for kind in kinds:
            topic = bench.topic(f"{kind.name}-in")
            produce(bootstrap, topic, corpus.events(kind, profile.events, kind.name))
            print(f"{kind.label}: raw loop, Kafka only ...", flush=True)
            runs[f"raw_kafka_{kind.name}"] = bench.raw(
                f"rawk-{kind.name}",
                topic,
                profile.events,
                decode=False,
                latency_events=corpus.events(kind, latency_count, f"lat-rawk-{kind.name}"),
            )
            print(f"{kind.label}: raw loop + decode ...", flush=True)
            runs[f"raw_decode_{kind.name}"] = bench.raw(
                f"rawd-{kind.name}", topic, profile.decode_events, decode=True, latency_events=None
            )
            print(f"{kind.label}: service, ENGINE=echo ...", flush=True)
            runs[f"service_{kind.name}"] = bench.service(
                f"svc-{kind.name}", topic, corpus.events(kind, latency_count, f"lat-svc-{kind.name}")
            )

        scaling = []
        for processes in () if args.no_scaling else profile.scaling:
            print(f"scaling: {processes} service process(es) on {PARTITIONS} partitions ...", flush=True)
            scaling.append(bench.scaling(corpus, processes))

        report = build_report(runs, kinds, scaling, profile, corpus, command, started, load_before, extra_env)
        if sink is not None:
            report["tracing_exports"] = {"requests": sink.requests, "bytes": sink.bytes}
    print_report(report)
    chart_path = args.output.with_name(args.output.stem + "_stages.png")
    chart(report, chart_path)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output} and {chart_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
