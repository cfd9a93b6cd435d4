"""The messages this service reads and writes, as pydantic models; schemas/ is generated from them.

Input (INPUT_TOPIC): a `DiagramEvent`. Output (OUTPUT_TOPIC): a `DiagramResult` under the input's
key. Dead letter (DLQ_TOPIC): the input's key and value bytes unchanged (the value left out when it
is too large to send again), with `DeadLetterHeaders` as Kafka headers.

Everything here is input from other services: `parse_event` turns any bytes into either an event
whose result can be serialised or a `ParseError` that names the field at fault.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Collection, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticSerializationError, to_json

from consumer.errors import ParseError, Stage
from consumer.structured import StructuredError, parse_description

MAX_ID_CHARS = 256
"""An id travels in every log line and dead-letter header, so it is kept short."""
MAX_PROMPT_CHARS = 8192
"""An event's prompt goes to the model as is; a huge one would cost minutes of compute and memory."""
MAX_METADATA_DEPTH = 32
"""metadata is passed through to the result, which must serialise: deeper nesting is refused up front."""


class ImageRef(BaseModel):
    """Where the image is: exactly one of an http(s) URL, a path under IMAGE_ROOT, or inline base64."""

    # The schema says "exactly one" as the validator below does: one reference is a string, the others
    # are absent or null.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": [name], "properties": {name: {"type": "string"}}} for name in ("url", "path", "base64")
            ]
        },
    )

    url: str | None = Field(None, description="http:// or https:// URL of the image")
    path: str | None = Field(None, description="file path, relative to IMAGE_ROOT (or absolute inside it)")
    base64: str | None = Field(
        None,
        description="the image bytes, base64-encoded (standard alphabet, '=' padding; line breaks are "
        "ignored; a data:<type>;base64, prefix is accepted)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        given = [name for name in ("url", "path", "base64") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"image needs exactly one of url, path, base64; got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in ("url", "path", "base64") if getattr(self, name) is not None)


NOT_IN_SCHEMA = (
    "Checks this schema cannot express, which the service also makes before it accepts an event: the record "
    "is UTF-8 JSON of at most MAX_EVENT_BYTES (1,000,000 bytes unless configured), no string anywhere holds "
    "a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), and metadata is nested at most "
    f"{MAX_METADATA_DEPTH} levels deep."
)


class DiagramEvent(BaseModel):
    """A request to describe one diagram. Unknown extra fields are ignored, so producers can add some."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="the caller's id; copied to the result")
    image: ImageRef
    prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="instruction overriding the default PROMPT"
    )
    metadata: dict[str, Any] | None = Field(None, description="passed through to the result as input_metadata")
    adapter: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="the name of the LoRA adapter to describe the image with: `default` (ADAPTER_PATH) or one of "
        "ADAPTERS; absent or null: `default`. An unknown name is dead-lettered at the parse stage "
        "(error.reason unknown_adapter) with the names this replica knows",
    )

    @field_validator("metadata")
    @classmethod
    def _passes_through(cls, metadata: dict[str, Any] | None) -> dict[str, Any] | None:
        # Checked here, because a result that cannot be serialised would fail after the model ran.
        if metadata is not None:
            if _depth(metadata, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
                raise ValueError(f"nested deeper than {MAX_METADATA_DEPTH} levels")
            try:
                to_json(metadata)
            except PydanticSerializationError as exc:
                raise ValueError(f"cannot be passed through to the result: {exc}") from None
        return metadata


def _depth(value: Any, limit: int, level: int = 1) -> int:
    """Nesting depth of a JSON value, counting stops just past `limit`."""
    if level > limit or not isinstance(value, (dict, list)):
        return level
    children = value.values() if isinstance(value, dict) else value
    nested = (child for child in children if isinstance(child, (dict, list)))
    return max((_depth(child, limit, level + 1) for child in nested), default=level)


class Source(BaseModel):
    topic: str
    partition: int
    offset: int


class Step(BaseModel):
    """One row of a description's table whose columns are the known three (number, step, role)."""

    number: int | None = Field(description="the row's number, or null when its cell is not a whole number")
    step: str
    role: str


class StructuredDescription(BaseModel):
    """The first markdown table of a description, as data (consumer/structured.py says how it is read)."""

    columns: list[str] = Field(description="the header's cells")
    rows: list[list[str]] = Field(description="each data row's cells, as many as there are columns")
    steps: list[Step] | None = Field(
        description="the rows as steps, when the columns are number, step and role (in English or Russian, "
        "e.g. | № | Step | Role | or | № | Наименование действия | Роль |); null otherwise"
    )


StructuredField = Annotated[
    StructuredDescription | None,
    Field(description="the description's table as data; null when it has none that can be read"),
]
StructuredErrorField = Annotated[
    str | None,
    Field(
        description="why `structured` is null, as 'reason: message' (reasons: no_table, no_rows, ragged_rows, "
        "too_large); null when it is set"
    ),
]


def description_fields(description: str) -> dict[str, Any]:
    """A result's description fields: the text, and its table parsed (or why it could not be)."""
    try:
        table = parse_description(description)
    except StructuredError as error:
        return {"description": description, "structured": None, "structured_error": str(error)}
    return {"description": description, "structured": table.as_dict(), "structured_error": None}


class GenerationMetadata(BaseModel):
    """What the old HTTP service's users relied on, for a Kafka result and a POST /infer answer alike."""

    inference_time: float = Field(description="seconds from the event's arrival (or the request) to its description")
    generation_time: float = Field(description="seconds of model generation: this image's share of its model call")
    image_size: tuple[int, int] = Field(description="[width, height] of the decoded image")
    model: str
    adapter: str | None = Field(description="the LoRA adapter path, or null when the base model ran alone")
    adapter_name: str | None = Field(
        None,
        description="the adapter's name: `default` (ADAPTER_PATH, also when the base model ran alone) or the "
        "one of ADAPTERS the event named; null from an engine without adapters (ENGINE=echo)",
    )
    adapter_hash: str | None = Field(
        None,
        description="sha256, hex, over the adapter's adapter_config.json and weight files (each as its name, size "
        "and bytes, in name order): the content that ran, which changes when the adapter is reloaded, and "
        "the adapter part of result_key; null when the base model ran alone",
    )
    device: str
    dtype: str | None = Field(
        None,
        description="the model's dtype (float32, bfloat16, float16): TORCH_DTYPE=auto picks it per device and CPU "
        "flavour, and the same image gives the same text only on the same hardware, dtype and settings",
    )
    output_tokens: int


CacheStatus = Literal["hit", "miss", "off"]
"""How a result met the result cache (consumer/result_cache/)."""


class ResultMetadata(GenerationMetadata):
    batch_size: int = Field(
        description="how many events shared this event's generate call; 0 when the description came from the "
        "result cache (cache: hit) and no call was made"
    )
    source: Source
    content_hash: str | None = Field(None, description="sha256 of the image's bytes as fetched (before decoding), hex")
    result_key: str | None = Field(
        None,
        description="sha256, hex, of what determines the description: the image's bytes, the prompt, the model "
        "(id, and for a local directory its config and weight files), the content of the adapter the event names "
        "(and with ADAPTERS, that it ran unmerged), max_new_tokens, the image pixel bounds and the dtype; the key "
        "of the result cache (docs/result-cache.md)",
    )
    cache: CacheStatus = Field(
        "off",
        description="hit: answered from the result cache without running the model (generation_time 0, "
        "batch_size 0, output_tokens those of the original generation); miss: generated, and cached; off: no "
        "result cache is configured (RESULT_CACHE_TOPIC unset)",
    )


class InferResponse(BaseModel):
    """POST /infer's answer: the old HTTP service's `{description, metadata}`, and the table as data."""

    description: str
    structured: StructuredField = None
    structured_error: StructuredErrorField = None
    metadata: GenerationMetadata


class DiagramResult(BaseModel):
    id: str
    description: str
    structured: StructuredField = None
    structured_error: StructuredErrorField = None
    metadata: ResultMetadata
    input_metadata: dict[str, Any] | None = None


REPLAY_COUNT_HEADER = "replay.count"
"""How many times `python -m consumer replay` has sent a record back to the input topic: a header of
each record it sends (decimal text), and of a dead letter whose input carried it."""

MAX_HEADER_CHARS = 512
"""A dead-letter header's value is cut to this many characters (error.message: MAX_MESSAGE_CHARS)."""
MAX_MESSAGE_CHARS = 2000
MAX_HISTORY_CHARS = 4096
"""error.history (and a retry record's retry.errors) at most: consumer/stages/retry.py keeps it a JSON array."""


def header_text(text: str, limit: int = MAX_HEADER_CHARS) -> str:
    """`text` as a Kafka header can always carry it: valid UTF-8 (a lone surrogate or other character
    that cannot be encoded becomes a backslash escape), at most `limit` characters ("..." marks a cut)."""
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


class DeadLetterHeaders(BaseModel):
    """Headers of a dead-letter record; its key and value are the input's, unchanged, unless a header
    below says one was left out or replaced to make the dead letter fit.

    Every header is valid UTF-8 and bounded in length whatever the input held, so a dead letter can
    always be produced."""

    model_config = ConfigDict(populate_by_name=True)

    error_stage: Stage = Field(alias="error.stage", description="the stage that failed")
    error_class: str = Field(
        alias="error.class",
        description="the exception class, e.g. FetchError; for a failure nobody foresaw (error.reason "
        "`unexpected`), the class of the exception that was raised",
    )
    error_message: str = Field(alias="error.message", description="what went wrong and what to fix")
    error_reason: str = Field(alias="error.reason", description="short machine-readable reason")
    error_attempts: str = Field(
        alias="error.attempts",
        description="how many times processing was tried, retry hops included (RETRY_DELAYS)",
    )
    error_history: str | None = Field(
        None,
        alias="error.history",
        description="present when the event went through retry topics (RETRY_DELAYS): every attempt's error, "
        'oldest first, as a JSON array of "stage/reason: message" strings (each at most 200 characters; past '
        f"{MAX_HISTORY_CHARS} characters in all, attempts from the middle are left out and one entry says how many)",
    )
    source_topic: str = Field(alias="source.topic")
    source_partition: str = Field(alias="source.partition")
    source_offset: str = Field(alias="source.offset")
    event_id: str | None = Field(None, alias="event.id", description="the event's id, when it could be read")
    error_value_omitted: str | None = Field(
        None,
        alias="error.value_omitted",
        description="present when the record's value was left out of the dead letter because it is over "
        "MAX_EVENT_BYTES or over what the producer or the dead-letter topic accepts: the value's size in bytes "
        "(read it from source.topic/partition/offset)",
    )
    error_key_hashed: str | None = Field(
        None,
        alias="error.key_hashed",
        description="present when the record's key was too large to send again: the key's size in bytes; the "
        "dead letter's key is then the SHA-256 of the original key, in hex",
    )
    replay_count: str | None = Field(
        None,
        alias="replay.count",  # REPLAY_COUNT_HEADER (a field alias must be a literal)
        description="the input record's replay.count header, when it had one: how many times `python -m consumer "
        "replay` had sent it back already (replay refuses to send it again at --max-replays)",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _producible(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        limits = {"error_message": MAX_MESSAGE_CHARS, "error_history": MAX_HISTORY_CHARS}
        return header_text(value, limits.get(info.field_name or "", MAX_HEADER_CHARS))

    def kafka_headers(self) -> list[tuple[str, str | bytes | None]]:
        """The headers as a Kafka record carries them, in field order; absent optional ones left out."""
        return [(name, value) for name, value in self.model_dump(by_alias=True, exclude_none=True).items()]


def parse_event(value: bytes | None, max_bytes: int | None = None) -> DiagramEvent:
    """Parse an input record's value; every failure is a `ParseError` naming the field.

    A value over `max_bytes` (MAX_EVENT_BYTES) is refused before it is parsed.
    """
    if value is None:
        raise ParseError("record has no value (tombstone); expected a JSON diagram event", reason="empty")
    if max_bytes is not None and len(value) > max_bytes:
        raise ParseError(
            f"event is {len(value)} bytes, over MAX_EVENT_BYTES={max_bytes}; "
            "send large images as a url or path reference instead of inline base64",
            reason="too_large",
        )
    try:
        document = json.loads(value)
    except RecursionError:
        raise ParseError("value is JSON nested too deeply to parse", reason="not_json") from None
    except ValueError as exc:  # also bad UTF-8, and integers longer than Python converts
        raise ParseError(f"value is not JSON: {exc}", reason="not_json") from None
    if not isinstance(document, dict):
        raise ParseError(f"event must be a JSON object, got {type(document).__name__}", reason="not_object")
    field = _field_with_lone_surrogate(document)
    if field is not None:
        raise ParseError(
            f"{field}: holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), which no "
            "result or header can carry; send valid Unicode",
            reason="invalid_unicode",
        )
    try:
        return DiagramEvent.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'event'}: {error['msg']}" for error in exc.errors()
        )
        raise ParseError(f"invalid event: {problems}", reason="invalid_field") from None


def check_adapter(event: DiagramEvent, known: Collection[str]) -> None:
    """Refuse an event naming an adapter this replica does not serve (ADAPTER_PATH is `default`, ADAPTERS the
    others): a `ParseError` listing the known names, since another replica of the group would refuse it too."""
    if event.adapter is not None and event.adapter not in known:
        raise ParseError(
            f"adapter {event.adapter!r} is not served here; known adapters: {', '.join(known)} "
            "(ADAPTER_PATH is `default`, ADAPTERS names the others)",
            reason="unknown_adapter",
        )


def _field_with_lone_surrogate(document: dict[str, Any]) -> str | None:
    """The first top-level field (or "event", for a key) whose JSON text cannot be encoded as UTF-8."""
    for key, value in document.items():
        try:
            key.encode("utf-8")
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return key if key.isprintable() and key.isascii() else "event"
        except (ValueError, RecursionError):
            continue  # nested too deeply: the model validation refuses it with a clearer message
    return None


_ID_PATTERN = re.compile(rb'"id"\s*:\s*"((?:[^"\\]|\\.){0,512})"')
ID_HINT_SCAN_BYTES = 65536
"""How far into a record too large to parse the id is looked for."""


def event_id_hint(value: bytes | None, max_bytes: int | None = None) -> str | None:
    """The `id` of a record that failed to parse, when there is one to read: for logs and headers.

    A value over `max_bytes` (MAX_EVENT_BYTES) is not parsed at all: its first ID_HINT_SCAN_BYTES are
    searched for a string `"id"` instead, so an oversized record costs no more than a small one.
    Always valid UTF-8 and at most 200 characters, so it is safe to put in a Kafka header.
    """
    if not value:
        return None
    if max_bytes is not None and len(value) > max_bytes:
        match = _ID_PATTERN.search(value, 0, ID_HINT_SCAN_BYTES)
        if match is None:
            return None
        try:
            hint = json.loads(b'"' + match.group(1) + b'"')
        except ValueError:
            return None
        return header_text(hint, 200) if isinstance(hint, str) else None
    try:
        document = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or "id" not in document:
        return None
    identifier = document["id"]
    try:
        hint = identifier if isinstance(identifier, str) else json.dumps(identifier)[:200]
    except (ValueError, RecursionError):  # nested too deeply to show
        return None
    return header_text(hint, 200)
