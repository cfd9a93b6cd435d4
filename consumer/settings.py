"""All configuration, from the environment, in one frozen object built once in main() and passed down.

Names of the old HTTP service are kept (BASE_MODEL_ID, ADAPTER_PATH, DEVICE, TORCH_DTYPE,
MAX_NEW_TOKENS, HF_HOME, HF_TOKEN, HTTP_PORT). Any librdkafka setting can be given as KAFKA_<NAME>
with dots as underscores (KAFKA_SECURITY_PROTOCOL=SASL_SSL -> security.protocol), so SASL and TLS
clusters need no code change.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from consumer.engine.adapters import DEFAULT_ADAPTER, check_adapter_names, parse_adapters

# Librdkafka properties whose values are secrets: never logged, never shown on /health.
SECRET_KAFKA_KEYS = (
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.pem",
    "sasl.oauthbearer.config",
)

# KAFKA_* variables that are settings of this service, not librdkafka properties.
_OWN_KAFKA_FIELDS = {"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_GROUP_ID"}

SERVICE_NAME = "diagram-consumer"
"""How the service names itself to the brokers: the first part of every client.id it derives."""


MAX_RETRY_DELAYS = 16
"""RETRY_DELAYS holds at most this many delays (each one is a topic, and a line of every dead letter's
error.history)."""
MAX_RETRY_DELAY_MS = 7 * 24 * 3600 * 1000
"""The longest retry delay: a week, Kafka's default retention; a record must outlive its wait."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """`1m`, `10m`, `1h`, `90s`, `250ms`, `2d` or a bare number of seconds, as whole milliseconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text.strip()!r} (a number with ms, s, m, h or d)")
    number, unit = match.groups()
    return round(float(number) * _UNIT_MS[(unit or "s").lower()])


class Settings(BaseSettings):
    """The service's settings; each field reads the environment variable of the same name, upper-cased."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    # -- model (names kept from the old service) ----------------------------------------------
    engine: Literal["transformers", "echo"] = "transformers"
    """transformers runs the model; echo answers a fixed text without one (pipeline benchmarks only)."""
    base_model_id: str = "Qwen/Qwen3-VL-2B-Instruct"
    """A Hugging Face model id or a local directory."""
    adapter_path: Path = Path("/app/models/weights")
    """The LoRA adapter directory, the adapter named `default`; missing or empty means the base model runs
    alone for events without `adapter`."""
    adapters: Annotated[tuple[tuple[str, Path], ...], NoDecode] = ()
    """ADAPTERS: further LoRA adapters on the same base model, `name=path,...`; an event names one in its
    `adapter` field (consumer/engine/adapters.py). Unset: only `default`, merged into the weights at load.
    Set: every adapter stays unmerged and each batch runs on one of them (consumer/engine/qwen.py)."""
    adapter_poll_seconds: float = Field(30.0, ge=0)
    """How often each adapter's directory is checked for new content, which is then loaded without a restart
    (consumer/engine/reload.py); 0: never."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_new_tokens: int = Field(384, ge=1, le=8192)
    hf_home: str | None = None
    hf_token: SecretStr | None = None
    prompt: str = (
        "Describe this diagram as a markdown table with the columns | № | Step | Role |: "
        "one row per step, in order, with the role or swimlane that performs it."
    )
    image_min_pixels: int = Field(64 * 32 * 32, ge=32 * 32)
    """Images are upscaled to at least this many pixels before the vision encoder."""
    image_max_pixels: int = Field(1024 * 32 * 32, ge=32 * 32)
    """Images are downscaled to at most this many pixels: 1,048,576 = at most 1024 visual tokens."""
    torch_compile: bool = False
    """torch.compile(dynamic=True) of the model's forward (for a PeftModel, of the model beneath it). Under
    BATCH_INVARIANT that forward is the per-image prefill; the decode steps run uncompiled."""
    kv_cache: Literal["auto", "static", "dynamic"] = "auto"
    """BATCH_INVARIANT=false only (the invariant decoder keeps one preallocated cache per image). KV
    cache during generation: static (preallocated, updated in place, attention reading only the
    filled part: consumer/engine/kv_cache.py) or dynamic (grown by concatenation every step). auto:
    static on cpu, where copying a growing cache each step cost more than the attention itself
    (bench/engine_cpu.py); dynamic elsewhere until measured on a GPU."""
    decode_matmul: Literal["auto", "onednn", "default"] = "auto"
    """Whether CPU matmuls may run on oneDNN where PyTorch's default kernel was measured slower. auto:
    float32 linear layers send calls of up to 128 rows to oneDNN, 1.1-2.3x faster than PyTorch's GEMM
    there (consumer/engine/onednn.py; not with TORCH_COMPILE, which cannot lower it), and
    BATCH_INVARIANT's decode runs float32 on oneDNN and bfloat16 on weights prepacked for oneDNN
    (consumer/engine/invariant.py). default: PyTorch's kernels everywhere. onednn: as auto, but refuse
    to start where the float32 routing cannot apply."""
    quantization: Literal["int8", "4bit"] | None = None
    batch_invariant: bool = True
    """true: an image's description depends on that image and the prompt alone, never on what shares its
    batch or in which order, in float32 and bfloat16 alike, so a redelivered event gets the text it got
    before (on the same hardware, dtype and settings). Each image is prefilled on its own and decoded
    with attention over its own cache only and matmuls of a fixed row count (consumer/engine/invariant.py).
    false: batches run left-padded through transformers' generate, which gives up that guarantee: in
    bfloat16 an image's text can change with its batch. bench/README.md gives what each costs."""
    decode_rows: int | None = Field(None, ge=1, le=256)
    """BATCH_INVARIANT only: every decode-step matmul runs on exactly this many rows (padded or split).
    Unset: chosen per device, dtype and CPU flavour (consumer/engine/device.py decode_row_blocks).
    Replicas that must agree on a text must agree on it: another row count rounds differently."""
    batch_size: int | None = Field(None, ge=1, le=256)
    """Images per generate call at most. Unset: the engine's default for its device (16 on a CPU, 8
    elsewhere: consumer/engine/device.py default_batch_size)."""
    batch_max_wait_ms: int = Field(50, ge=0)
    echo_delay_ms: int = Field(0, ge=0)
    """ENGINE=echo only: sleep this long per generate call, to stand in for a slow model in tests."""

    # -- kafka ---------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_group_id: str = "diagram-consumer"
    input_topic: str = "diagram-events"
    output_topic: str = "diagram-descriptions"
    dlq_topic: str = "diagram-events-dlq"
    max_event_bytes: int = Field(1_000_000, ge=1)
    """Input records larger than this are dead-lettered unparsed, their value left out of the dead letter.
    The default is librdkafka's message.max.bytes, the largest record this service's producer sends."""
    max_in_flight: int = Field(64, ge=1)
    """Events polled but not yet published; when full, no record is taken and, after 2 s, the partitions
    are paused (polling goes on)."""
    max_in_flight_bytes: int = Field(256 * 1024 * 1024, ge=1)
    """The same window in bytes of input records (key and value): inline images are up to
    MAX_EVENT_BYTES each, so 64 events of them could hold 64 MB before any image is decoded."""
    shutdown_timeout: float = Field(30.0, gt=0)
    """SIGTERM: how long the batch being generated may take to finish and be published and committed."""
    revoke_timeout: float = Field(30.0, gt=0)
    """exactly_once: how long a revocation waits for the transaction in progress to end (less during
    shutdown: what is left of SHUTDOWN_TIMEOUT)."""
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """exactly_once: results, dead letters and input offsets committed in one Kafka transaction per batch."""
    transactional_id: str | None = None
    """exactly_once only: this replica's transactional.id; unset derives one (consumer/clients.py transactional_id)."""
    kafka_extra: dict[str, str] = Field(default_factory=dict)
    """Other librdkafka properties, collected from KAFKA_<NAME> variables by `from_environ`."""

    retry_delays: Annotated[tuple[int, ...], NoDecode] = ()
    """RETRY_DELAYS: how long a transiently failed event waits before each further attempt, as
    comma-separated durations (`1m,10m,1h`; units ms, s, m, h, d; a bare number is seconds), kept here
    in milliseconds. Each delay has its own retry topic (`retry_topic`). Empty (the default): transient
    fetch failures are retried in-process (3 attempts) and then dead-lettered, as before; set: one
    attempt in-process, then the event hops through the retry topics (consumer/stages/retry.py)."""

    propagate_headers: str = ""
    """Input headers copied onto results and dead letters besides W3C trace context (traceparent,
    tracestate, baggage): comma-separated names or globs, case-insensitive (`x-tenant,x-request-*`)."""
    cloudevents_type: str = "diagram.description"
    """`ce_type` of a result whose input was a CloudEvent (consumer/stages/headers.py)."""
    cloudevents_source: str = "/diagram-consumer"
    """`ce_source` of a result whose input was a CloudEvent: a URI reference naming this service."""

    # -- result cache (consumer/result_cache/) ------------------------------------------------------
    result_cache_topic: str | None = None
    """A log-compacted topic from result key to description: set, a repeated image (same bytes, prompt,
    model, adapter, generation settings and dtype) is answered from it without generating, and the
    replicas that share the topic share their answers. Unset: no cache (`metadata.cache` is "off")."""
    result_cache_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    """How much of the cache topic a replica keeps in memory (keys and values as serialised); the least
    recently used entries go first."""
    result_cache_load_timeout: float = Field(120.0, gt=0)
    """How long start-up waits to read the cache topic to its end before reporting ready with what it
    has (the rest is read while running)."""

    # -- images --------------------------------------------------------------------------------
    image_root: Path | None = None
    """Path references are allowed only under this directory; unset refuses them."""
    image_allowed_hosts: Annotated[frozenset[str], NoDecode] = frozenset()
    """Hosts that may be fetched although they resolve to private or loopback addresses."""
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    image_max_decoded_pixels: int = Field(40_000_000, ge=1)
    """Images larger than this (width x height, from the header) are refused before decoding."""
    image_fetch_timeout: float = Field(10.0, gt=0)
    """Seconds one fetch may take in all: name resolution, connecting, headers and body, redirects included."""
    image_decode_timeout: float = Field(10.0, gt=0)
    """Seconds of CPU one image may take to decode and convert to RGB. Decoding runs in a worker
    process that the kernel stops past this (RLIMIT_CPU, whole seconds, rounded up); the event is
    dead-lettered as decode/decode_timeout (consumer/images/worker.py)."""
    fetch_workers: int = Field(4, ge=1)

    # -- side server and logs ------------------------------------------------------------------
    http_port: int = 8002
    http_host: str = "0.0.0.0"
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    liveness_timeout: float = Field(60.0, gt=0)
    """/health/live answers 503 once the poll loop has not come round for this many seconds."""
    infer_endpoint: bool = False
    """Serve the old service's POST /infer (multipart `file`) on the side server, through the same engine."""
    test_hook: str | None = None
    """`module:function` called once at start, before the model loads: fault injection for tests,
    never for production (consumer/hooks.py)."""

    @field_validator("image_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return frozenset(host.strip().lower() for host in value.split(",") if host.strip())
        return value

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _parse_delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(parse_duration_ms(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_delays")
    @classmethod
    def _bounded_delays(cls, delays: tuple[int, ...]) -> tuple[int, ...]:
        if len(delays) > MAX_RETRY_DELAYS:
            raise ValueError(f"at most {MAX_RETRY_DELAYS} delays, got {len(delays)}")
        for delay in delays:
            if not 1 <= delay <= MAX_RETRY_DELAY_MS:
                raise ValueError(f"each delay must be between 1 ms and 7 days, got {delay} ms")
        return delays

    @field_validator("adapters", mode="before")
    @classmethod
    def _parse_adapters(cls, value: Any) -> Any:
        return parse_adapters(value) if isinstance(value, str) else value

    @field_validator("adapters")
    @classmethod
    def _valid_adapter_names(cls, pairs: tuple[tuple[str, Path], ...]) -> tuple[tuple[str, Path], ...]:
        return check_adapter_names(pairs)

    @field_validator("quantization", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", "none", "0") else value

    @field_validator("result_cache_topic", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _echo_only_without_a_mounted_model(self) -> Settings:
        # ENGINE=echo left over from a benchmark in a model deployment would answer every diagram
        # with the same fixed text; a mounted LoRA adapter says that a model was meant to run.
        if self.engine == "echo" and (self.adapter_path / "adapter_config.json").is_file():
            raise ValueError(
                f"ENGINE=echo answers a fixed text without running any model, but a LoRA adapter is "
                f"mounted at ADAPTER_PATH={self.adapter_path}: unset ENGINE to serve the model "
                "(echo is for pipeline benchmarks, where no adapter is mounted)"
            )
        if self.engine == "echo" and self.adapters:
            raise ValueError("ENGINE=echo runs no model, so it cannot serve ADAPTERS: unset one of them")
        return self

    def adapter_paths(self) -> dict[str, Path]:
        """Every adapter this replica serves, by name: `default` (ADAPTER_PATH) first, then ADAPTERS."""
        return {DEFAULT_ADAPTER: self.adapter_path, **dict(self.adapters)}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `environ` (default: os.environ), KAFKA_<NAME> passthrough included."""
        environ = os.environ if environ is None else environ
        extra = {
            key[len("KAFKA_") :].lower().replace("_", "."): value
            for key, value in environ.items()
            if key.upper().startswith("KAFKA_") and key.upper() not in _OWN_KAFKA_FIELDS
        }
        if environ is os.environ:
            return cls(kafka_extra=extra, **overrides)
        fields = {name: environ[name.upper()] for name in cls.model_fields if name.upper() in environ}
        return cls(**{**fields, "kafka_extra": extra, **overrides})

    # -- librdkafka configuration ---------------------------------------------------------------
    def replica_name(self) -> str:
        """This replica among its group's members: KAFKA_GROUP_INSTANCE_ID under static membership, else
        `<hostname>-<pid>`. Unique among live replicas, and the same again when a container restarts in
        its pod (hostname and pid 1 kept). Part of the derived client.id and transactional.id."""
        return self.kafka_extra.get("group.instance.id") or f"{socket.gethostname()}-{os.getpid()}"

    def client_id(self, group: str | None = None) -> str:
        """librdkafka's client.id for every client of this process (consumer, producer, admin):
        KAFKA_CLIENT_ID if set, else `diagram-consumer-<group>-<replica_name()>`, `group` being
        KAFKA_GROUP_ID unless given. Broker logs, request quotas and `kafka-consumer-groups --describe`
        then say which service, group and replica a connection belongs to."""
        derived = f"{SERVICE_NAME}-{group or self.kafka_group_id}-{self.replica_name()}"
        return self.kafka_extra.get("client.id") or derived

    def consumer_config(self) -> dict[str, Any]:
        """The librdkafka consumer config: manual offset commits, cooperative rebalancing, bounded prefetch.

        fetch.min.bytes and fetch.wait.max.ms keep their defaults (1 byte, 500 ms): a fetch returns as
        soon as one event is there, so batching never waits on the broker (docs/performance.md, Kafka client tuning).
        """
        return {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "client.id": self.client_id(),
            "group.id": self.kafka_group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            # Never process records of aborted upstream transactions (librdkafka's default, made explicit).
            "isolation.level": "read_committed",
            # Events carry whole images, and they wait here while the in-flight window is full: 16 MB
            # (default 64 MB) is about a thousand inline 1024x768 PNG diagrams, seconds of work.
            "queued.max.messages.kbytes": 16384,
            # Once that bound is reached, look again after 0.1 s rather than the default 1 s, so a
            # replica that drains its queue fast does not idle waiting for the next fetch.
            "fetch.queue.backoff.ms": 100,
            **self.kafka_extra,
        }

    def producer_config(self) -> dict[str, Any]:
        """The librdkafka producer config: idempotent, acks=all, compressed results.

        A batch's results are produced together, so a 5 ms linger puts them in one request per broker
        and adds at most 5 ms to the result; zstd shrinks the repetitive JSON results (and the rare
        dead letter carrying a whole inline image).
        """
        return {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "client.id": self.client_id(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "zstd",
            **self.kafka_extra,
        }

    def retry_topic(self, delay_ms: int) -> str:
        """The retry topic of one of RETRY_DELAYS: `<INPUT_TOPIC>-retry-<delay>`, the delay in whole
        seconds (`diagram-events-retry-600s`), or in milliseconds when it is not a whole number of
        seconds (`diagram-events-retry-250ms`)."""
        suffix = f"{delay_ms // 1000}s" if delay_ms % 1000 == 0 else f"{delay_ms}ms"
        return f"{self.input_topic}-retry-{suffix}"

    def retry_topics(self) -> list[str]:
        """Every retry topic, one per distinct delay, in the order of RETRY_DELAYS."""
        return list(dict.fromkeys(self.retry_topic(delay) for delay in self.retry_delays))

    def propagate_header_patterns(self) -> list[str]:
        return [name.strip().lower() for name in self.propagate_headers.split(",") if name.strip()]

    def redacted_kafka_config(self) -> dict[str, Any]:
        return {k: ("***" if k in SECRET_KAFKA_KEYS else v) for k, v in self.consumer_config().items()}
