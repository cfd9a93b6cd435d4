"""schemas/ is what downstream teams code against: it must match the models the service uses."""

import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.errors import ParseError
from consumer.events import MAX_METADATA_DEPTH, parse_event
from consumer.schemas import render

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


def test_schemas_in_repo_match_the_models():
    for name, text in render().items():
        on_disk = (SCHEMA_DIR / name).read_text()
        assert on_disk == text, f"schemas/{name} is stale: run `make schemas`"


EVENT_SCHEMA = jsonschema.Draft202012Validator(json.loads((SCHEMA_DIR / "diagram-event.schema.json").read_text()))


def service_accepts(document: object) -> bool:
    try:
        parse_event(json.dumps(document).encode(), max_bytes=1_000_000)
    except ParseError:
        return False
    return True


def beyond_the_schema(document: object) -> bool:
    """Whether `document` breaks one of the checks the schema's description lists as not expressible."""
    text = json.dumps(document, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    metadata = document.get("metadata") if isinstance(document, dict) else None
    return len(text) > 900_000 or (isinstance(metadata, (dict, list)) and depth(metadata) > MAX_METADATA_DEPTH)


def depth(value: object) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return 1 + max((depth(child) for child in children if isinstance(child, (dict, list))), default=0)


# What producers really send, and what they get wrong: (document, accepted).
CORPUS = [
    ({"id": "a", "image": {"url": "https://example.com/d.png"}, "metadata": {"x": 1}}, True),
    ({"id": "a", "image": {"path": "2026/11/a.png"}}, True),
    ({"id": "a", "image": {"base64": "AAAA"}, "prompt": "List the steps.", "extra": [1, 2]}, True),
    ({"id": "a", "image": {"url": None, "base64": "AAAA"}}, True),  # nulls are absent references
    ({"id": "a", "image": {"url": "https://x/y.png", "path": None, "base64": None}}, True),
    ({"id": "z", "image": {}}, False),
    ({"id": "y", "image": {"path": "a.png", "base64": "AAAA"}}, False),
    ({"id": "y", "image": {"url": None}}, False),
    ({"id": "y", "image": {"url": 5}}, False),
    ({"id": "y", "image": {"ftp": "ftp://x/y.png"}}, False),
    ({"id": "y", "image": "https://x/y.png"}, False),
    ({"id": "", "image": {"base64": "AAAA"}}, False),
    ({"id": "x" * 257, "image": {"base64": "AAAA"}}, False),
    ({"id": 7, "image": {"base64": "AAAA"}}, False),
    ({"image": {"base64": "AAAA"}}, False),
    ({"id": "a", "image": {"base64": "AAAA"}, "prompt": "p" * 8193}, False),
    ({"id": "a", "image": {"base64": "AAAA"}, "metadata": [1]}, False),
    ([{"id": "a", "image": {"base64": "AAAA"}}], False),
]


@pytest.mark.parametrize("document, accepted", CORPUS, ids=[str(i) for i in range(len(CORPUS))])
def test_the_schema_and_the_service_agree_on_the_corpus(document, accepted):
    assert EVENT_SCHEMA.is_valid(document) is accepted
    assert service_accepts(document) is accepted


def test_what_the_schema_cannot_say_is_listed_in_its_description():
    deep: object = "leaf"
    for _ in range(MAX_METADATA_DEPTH + 1):
        deep = [deep]
    for document in (
        {"id": "a\ud800", "image": {"base64": "AAAA"}},
        {"id": "a", "image": {"url": "https://x/\udfff.png"}},
        {"id": "a", "image": {"base64": "AAAA"}, "metadata": {"deep": deep}},
    ):
        assert EVENT_SCHEMA.is_valid(document) and not service_accepts(document)
        assert beyond_the_schema(document)
    description = EVENT_SCHEMA.schema["description"]
    assert "MAX_EVENT_BYTES" in description and "surrogate" in description and "levels deep" in description


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=20,
)
references = st.dictionaries(
    st.sampled_from(["url", "path", "base64", "ftp"]), st.none() | st.text(max_size=20) | json_values, max_size=3
)
hostile_text = st.text(st.characters() | st.sampled_from("\ud800\udfff\x00\u200f"), max_size=300)


@st.composite
def near_events(draw: st.DrawFn) -> dict[str, object]:
    """A valid-looking event, then perhaps one field made wrong: where schema and service could disagree."""
    kind = draw(st.sampled_from(["url", "path", "base64"]))
    image: dict[str, object] = {kind: draw(hostile_text)}
    for other in draw(st.lists(st.sampled_from(["url", "path", "base64", "ftp"]), max_size=2)):
        image[other] = draw(st.none() | hostile_text | json_values)
    event: dict[str, object] = {"id": draw(st.text(min_size=1, max_size=256) | hostile_text), "image": image}
    if draw(st.booleans()):
        event["prompt"] = draw(st.none() | st.text(max_size=50) | st.text(min_size=8190, max_size=8195))
    if draw(st.booleans()):
        event["metadata"] = draw(st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3))
    if draw(st.booleans()):
        field = draw(st.sampled_from(["id", "image", "prompt", "metadata"]))
        event[field] = draw(json_values | hostile_text)
    return event


documents = (
    near_events()
    | near_events()
    | st.fixed_dictionaries(
        {},
        optional={
            "id": hostile_text | json_values,
            "image": references | json_values,
            "prompt": st.none() | hostile_text | json_values,
            "metadata": st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values,
            "extra": json_values,
        },
    )
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(documents)
def test_the_schema_and_the_service_agree_on_arbitrary_events(document):
    """Both directions: what the schema accepts is never refused at the parse stage (except for the checks
    its description lists), and what it refuses is refused."""
    valid = EVENT_SCHEMA.is_valid(document)
    if valid and not beyond_the_schema(document):
        assert service_accepts(document), document
    if not valid:
        assert not service_accepts(document), document
