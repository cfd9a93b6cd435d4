"""All configuration, from the environment, in one frozen object built once in main() and passed down.

Names of the old HTTP service are kept (BASE_MODEL_ID, ADAPTER_PATH, DEVICE, TORCH_DTYPE,
MAX_NEW_TOKENS, HF_HOME, HF_TOKEN, HTTP_PORT). Any librdkafka setting can be given as KAFKA_<NAME>
with dots as underscores (KAFKA_SECURITY_PROTOCOL=SASL_SSL -> security.protocol), so SASL and TLS
clusters need no code change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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


class Settings(BaseSettings):
    """The service's settings; each field reads the environment variable of the same name, upper-cased."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    # -- model (names kept from the old service) ----------------------------------------------
    engine: Literal["transformers", "echo"] = "transformers"
    """transformers runs the model; echo answers a fixed text without one (pipeline benchmarks only)."""
    base_model_id: str = "Qwen/Qwen3-VL-2B-Instruct"
    """A Hugging Face model id or a local directory."""
    adapter_path: Path = Path("/app/models/weights")
    """The LoRA adapter directory; missing or empty means the base model runs alone."""
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
    """Events polled but not yet published; when full, partitions are paused (polling goes on)."""
    shutdown_timeout: float = Field(30.0, gt=0)
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """exactly_once: results, dead letters and input offsets committed in one Kafka transaction per batch."""
    transactional_id: str | None = None
    """exactly_once only: this replica's transactional.id; unset derives one (see consumer/delivery.py)."""
    kafka_extra: dict[str, str] = Field(default_factory=dict)
    """Other librdkafka properties, collected from KAFKA_<NAME> variables by `from_environ`."""

    # -- images --------------------------------------------------------------------------------
    image_root: Path | None = None
    """Path references are allowed only under this directory; unset refuses them."""
    image_allowed_hosts: Annotated[frozenset[str], NoDecode] = frozenset()
    """Hosts that may be fetched although they resolve to private or loopback addresses."""
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    image_max_decoded_pixels: int = Field(40_000_000, ge=1)
    """Images larger than this (width x height, from the header) are refused before decoding."""
    image_fetch_timeout: float = Field(10.0, gt=0)
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

    @field_validator("quantization", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", "none", "0") else value

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
        return self

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
    def consumer_config(self) -> dict[str, Any]:
        """The librdkafka consumer config: manual offset commits, cooperative rebalancing, bounded prefetch.

        fetch.min.bytes and fetch.wait.max.ms keep their defaults (1 byte, 500 ms): a fetch returns as
        soon as one event is there, so batching never waits on the broker (README, Kafka client tuning).
        """
        return {
            "bootstrap.servers": self.kafka_bootstrap_servers,
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
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "zstd",
            **self.kafka_extra,
        }

    def redacted_kafka_config(self) -> dict[str, Any]:
        return {k: ("***" if k in SECRET_KAFKA_KEYS else v) for k, v in self.consumer_config().items()}
