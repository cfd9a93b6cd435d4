"""schemas/ is what downstream teams code against: it must match the models the service uses."""

import json
from pathlib import Path

import jsonschema

from consumer.schemas import render

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


def test_schemas_in_repo_match_the_models():
    for name, text in render().items():
        on_disk = (SCHEMA_DIR / name).read_text()
        assert on_disk == text, f"schemas/{name} is stale: run `make schemas`"


def test_event_schema_accepts_a_real_event_and_refuses_two_references():
    schema = json.loads((SCHEMA_DIR / "diagram-event.schema.json").read_text())
    jsonschema.validate({"id": "a", "image": {"url": "https://example.com/d.png"}, "metadata": {"x": 1}}, schema)
    # The "exactly one reference" rule lives in a validator, so the schema admits two; the service
    # dead-letters them (tests/unit/test_events.py). The schema still refuses unknown reference kinds.
    try:
        jsonschema.validate({"id": "a", "image": {"ftp": "x"}}, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("unknown reference kind accepted by the schema")
