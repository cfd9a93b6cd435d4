"""JSON Schemas of the three messages, generated from consumer.events: `python -m consumer.schemas DIR`.

schemas/ in the repository holds the output; tests/unit/test_schemas.py fails when it drifts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from consumer.events import NOT_IN_SCHEMA, DeadLetterHeaders, DiagramEvent, DiagramResult

SCHEMAS: dict[str, tuple[type[BaseModel], str]] = {
    "diagram-event.schema.json": (DiagramEvent, f"Input event on INPUT_TOPIC. {NOT_IN_SCHEMA}"),
    "diagram-result.schema.json": (DiagramResult, "Result on OUTPUT_TOPIC, keyed like its input"),
    "dead-letter-headers.schema.json": (
        DeadLetterHeaders,
        "Headers of a record on DLQ_TOPIC; its key and value are the input's, unchanged",
    ),
}


def render() -> dict[str, str]:
    rendered = {}
    for name, (model, title) in SCHEMAS.items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **model.model_json_schema(by_alias=True)}
        schema["description"] = title
        rendered[name] = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    return rendered


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (directory / name).write_text(text)


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas"))
