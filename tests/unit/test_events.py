"""Input events from other services: what is accepted, and how each refusal names what to fix.

The property tests feed arbitrary bytes and JSON: the only exception allowed out of `parse_event` is
`ParseError`, and whatever it accepts can be turned into a result and published.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.errors import ParseError
from consumer.events import (
    MAX_METADATA_DEPTH,
    DiagramResult,
    ResultMetadata,
    Source,
    event_id_hint,
    parse_event,
)

PROPERTY = hypothesis_settings(max_examples=200, deadline=None)


def event(**fields) -> bytes:
    return json.dumps({"id": "e-1", "image": {"url": "https://example.com/d.png"}, **fields}).encode()


def refusal(value: bytes | None, **options) -> ParseError:
    with pytest.raises(ParseError) as caught:
        parse_event(value, **options)
    return caught.value


def result_for(parsed) -> bytes:
    """The result the pipeline would publish for `parsed`: it must always serialise."""
    metadata = ResultMetadata(
        inference_time=1.0,
        generation_time=1.0,
        image_size=(1, 1),
        model="m",
        adapter=None,
        device="cpu",
        output_tokens=1,
        batch_size=1,
        source=Source(topic="t", partition=0, offset=0),
    )
    result = DiagramResult(id=parsed.id, description="d", metadata=metadata, input_metadata=parsed.metadata)
    return result.model_dump_json().encode()


def test_a_full_event_is_read_and_extra_fields_are_ignored():
    parsed = parse_event(event(prompt="list the steps", metadata={"team": "ops", "n": [1, 2]}, added_later=True))
    assert parsed.id == "e-1" and parsed.image.kind == "url" and parsed.prompt == "list the steps"
    assert parsed.metadata == {"team": "ops", "n": [1, 2]}
    for reference in ({"path": "a/b.png"}, {"base64": "AAAA"}):
        assert parse_event(event(image=reference)).image.kind == next(iter(reference))


@pytest.mark.parametrize(
    "value, reason, named",
    [
        (b"{not json", "not_json", "not JSON"),
        (b"\xff\xfe\x00garbage", "not_json", "not JSON"),
        (b"[" * 100_000, "not_json", "nested too deeply"),
        (b'{"id": ' + b"1" * 5000 + b"}", "not_json", "not JSON"),
        (b'["a list"]', "not_object", "JSON object"),
        (b'"text"', "not_object", "JSON object"),
        (json.dumps({"image": {"url": "https://x/y.png"}}).encode(), "invalid_field", "id"),
        (event(id=17), "invalid_field", "id"),
        (event(id=""), "invalid_field", "id"),
        (event(id="x" * 257), "invalid_field", "id"),
        (json.dumps({"id": "a"}).encode(), "invalid_field", "image"),
        (event(image=None), "invalid_field", "image"),
        (event(image="https://example.com/d.png"), "invalid_field", "image"),
        (event(image={}), "invalid_field", "exactly one of url, path, base64"),
        (
            event(image={"url": "https://x/y.png", "base64": "AAAA"}),
            "invalid_field",
            "exactly one of url, path, base64",
        ),
        (event(image={"ftp": "ftp://x/y.png"}), "invalid_field", "image.ftp"),
        (event(image={"url": 5}), "invalid_field", "image.url"),
        (event(prompt=["not", "text"]), "invalid_field", "prompt"),
        (event(prompt="p" * 9000), "invalid_field", "prompt"),
        (event(metadata="not an object"), "invalid_field", "metadata"),
    ],
)
def test_each_bad_event_is_refused_naming_what_is_wrong(value, reason, named):
    error = refusal(value)
    assert error.reason == reason and named in error.message, error.message
    assert error.stage == "parse"


def test_a_tombstone_is_refused():
    assert refusal(None).reason == "empty"


def test_an_event_over_the_byte_limit_is_refused_before_parsing():
    big = event(metadata={"blob": "x" * 5000})
    assert parse_event(big, max_bytes=len(big)).id == "e-1"
    error = refusal(big, max_bytes=len(big) - 1)
    assert error.reason == "too_large" and "MAX_EVENT_BYTES" in error.message
    assert refusal(b"{" * 10_000, max_bytes=100).reason == "too_large"  # not even parsed


def test_metadata_that_could_not_be_passed_through_is_refused_up_front():
    nested: object = "leaf"
    for _ in range(MAX_METADATA_DEPTH - 1):  # the metadata object itself is the first level
        nested = [nested]
    assert parse_event(event(metadata={"deep": nested}))  # at the limit, accepted
    error = refusal(event(metadata={"deep": [nested]}))
    assert "metadata" in error.message and "deeper" in error.message
    surrogate = b'{"id": "e-1", "image": {"base64": "AAAA"}, "metadata": {"note": "\\udc00"}}'
    assert "metadata" in refusal(surrogate).message


def test_the_id_hint_for_a_bad_record_is_always_safe_to_put_in_a_header():
    assert event_id_hint(b'{"id": "a\\ud800b"}').encode() == b"a?b"
    assert event_id_hint(b'{"id": ' + b"[" * 10_000 + b"}") is None
    assert event_id_hint(b'{"id": 7}') == "7"
    assert len(event_id_hint(json.dumps({"id": "x" * 10_000}).encode())) == 200
    assert event_id_hint(b"not json") is None and event_id_hint(None) is None


# -- properties ------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
references = st.dictionaries(st.sampled_from(["url", "path", "base64", "ftp"]), json_values | st.text(), max_size=3)
documents = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=300) | json_values,
        "image": references | json_values,
        "prompt": json_values,
        "metadata": json_values,
        "extra": json_values,
    },
)


@PROPERTY
@given(st.binary(max_size=500))
def test_any_bytes_either_parse_or_raise_parse_error(value):
    try:
        parse_event(value, max_bytes=400)
    except ParseError:
        pass
    event_id_hint(value)


@PROPERTY
@given(documents)
def test_any_json_object_either_parses_into_a_publishable_event_or_raises_parse_error(document):
    value = json.dumps(document).encode()
    try:
        parsed = parse_event(value)
    except ParseError as error:
        assert error.message and error.reason
        hint = event_id_hint(value)
        if hint is not None:
            hint.encode("utf-8")  # what the producer does with a header: must not raise
        return
    assert json.loads(result_for(parsed))["id"] == parsed.id
