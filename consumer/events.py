"""The messages this service reads and writes, as pydantic models; schemas/ is generated from them.

Input (INPUT_TOPIC): a `DiagramEvent`. Output (OUTPUT_TOPIC): a `DiagramResult` under the input's
key. Dead letter (DLQ_TOPIC): the input's key and value bytes unchanged, with `DeadLetterHeaders`
as Kafka headers.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from consumer.errors import ParseError


class ImageRef(BaseModel):
    """Where the image is: exactly one of an http(s) URL, a path under IMAGE_ROOT, or inline base64."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="http:// or https:// URL of the image")
    path: str | None = Field(None, description="file path, relative to IMAGE_ROOT (or absolute inside it)")
    base64: str | None = Field(None, description="the image bytes, base64-encoded (standard alphabet)")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        given = [name for name in ("url", "path", "base64") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"image needs exactly one of url, path, base64; got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in ("url", "path", "base64") if getattr(self, name) is not None)


class DiagramEvent(BaseModel):
    """A request to describe one diagram. Unknown extra fields are ignored, so producers can add some."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, description="the caller's id; copied to the result")
    image: ImageRef
    prompt: str | None = Field(None, description="instruction overriding the default PROMPT")
    metadata: dict[str, Any] | None = Field(None, description="passed through to the result as input_metadata")


class Source(BaseModel):
    topic: str
    partition: int
    offset: int


class ResultMetadata(BaseModel):
    inference_time: float = Field(description="seconds from the event's arrival to its description")
    generation_time: float = Field(description="seconds of model generation: this event's share of its batch")
    image_size: tuple[int, int] = Field(description="[width, height] of the decoded image")
    model: str
    adapter: str | None = Field(description="the LoRA adapter path, or null when the base model ran alone")
    device: str
    output_tokens: int
    batch_size: int = Field(description="how many events shared this event's generate call")
    source: Source


class DiagramResult(BaseModel):
    id: str
    description: str
    metadata: ResultMetadata
    input_metadata: dict[str, Any] | None = None


class DeadLetterHeaders(BaseModel):
    """Headers of a dead-letter record; the record's key and value are the input's, unchanged."""

    model_config = ConfigDict(populate_by_name=True)

    error_stage: str = Field(alias="error.stage", description="parse, fetch, decode, infer or publish")
    error_class: str = Field(alias="error.class", description="the exception class, e.g. FetchError")
    error_message: str = Field(alias="error.message", description="what went wrong and what to fix")
    error_reason: str = Field(alias="error.reason", description="short machine-readable reason")
    error_attempts: str = Field(alias="error.attempts", description="how many times processing was tried")
    source_topic: str = Field(alias="source.topic")
    source_partition: str = Field(alias="source.partition")
    source_offset: str = Field(alias="source.offset")
    event_id: str | None = Field(None, alias="event.id", description="the event's id, when it could be read")


def parse_event(value: bytes | None) -> DiagramEvent:
    """Parse an input record's value; every failure is a `ParseError` naming the field."""
    if value is None:
        raise ParseError("record has no value (tombstone); expected a JSON diagram event", reason="empty")
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParseError(f"value is not JSON: {exc}", reason="not_json") from None
    if not isinstance(document, dict):
        raise ParseError(f"event must be a JSON object, got {type(document).__name__}", reason="not_object")
    try:
        return DiagramEvent.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'event'}: {error['msg']}" for error in exc.errors()
        )
        raise ParseError(f"invalid event: {problems}", reason="invalid_field") from None


def event_id_hint(value: bytes | None) -> str | None:
    """The `id` of a record that failed to parse, when there is one to read: for logs and headers."""
    try:
        document = json.loads(value or b"")
        return str(document["id"])[:200] if isinstance(document, dict) and "id" in document else None
    except (ValueError, TypeError):
        return None
