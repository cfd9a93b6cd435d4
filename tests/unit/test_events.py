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

from consumer.errors import STAGES, ParseError
from consumer.events import (
    MAX_HEADER_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_METADATA_DEPTH,
    DeadLetterHeaders,
    DiagramResult,
    ResultMetadata,
    Source,
    check_adapter,
    description_fields,
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


METADATA = ResultMetadata(
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


def result_for(parsed) -> bytes:
    """The result the pipeline would publish for `parsed`: it must always serialise."""
    result = DiagramResult(id=parsed.id, description="d", metadata=METADATA, input_metadata=parsed.metadata)
    return result.model_dump_json().encode()


def test_a_full_event_is_read_and_extra_fields_are_ignored():
    parsed = parse_event(event(prompt="list the steps", metadata={"team": "ops", "n": [1, 2]}, added_later=True))
    assert parsed.id == "e-1" and parsed.image.kind == "url" and parsed.prompt == "list the steps"
    assert parsed.metadata == {"team": "ops", "n": [1, 2]}
    assert parsed.adapter is None and parse_event(event(adapter="bpmn")).adapter == "bpmn"
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
        (event(adapter=5), "invalid_field", "adapter"),
        (event(adapter=""), "invalid_field", "adapter"),
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
    assert event_id_hint(b'{"id": "a\\ud800b"}') == "a\\ud800b"  # the lone surrogate escaped, not lost
    assert event_id_hint(b'{"id": ' + b"[" * 10_000 + b"}") is None
    assert event_id_hint(b'{"id": 7}') == "7"
    assert len(event_id_hint(json.dumps({"id": "x" * 10_000}).encode())) == 200
    assert event_id_hint(b"not json") is None and event_id_hint(None) is None


def test_a_record_over_max_event_bytes_is_never_parsed_for_its_id_hint(monkeypatch):
    """A 10 MB record once cost 224 MB on the poll thread to find the id of its dead letter."""
    import consumer.events

    loads = json.loads

    def bounded_loads(text, *args, **kwargs):
        assert len(text) < 1000, f"json.loads of {len(text)} bytes"
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(consumer.events.json, "loads", bounded_loads)
    huge = b'{"metadata": {"a": 1}, "id": "order-\\u00e9-17", "image": {"base64": "' + b"A" * 10_000_000 + b'"}}'
    assert event_id_hint(huge, max_bytes=1_000_000) == "order-\u00e9-17"
    with pytest.raises(ParseError, match="MAX_EVENT_BYTES"):
        parse_event(huge, max_bytes=1_000_000)
    assert event_id_hint(b'{"image": {}, ' + b" " * 2_000_000 + b'"id": "far"}', max_bytes=1000) is None


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


@PROPERTY
@given(
    stage=st.sampled_from(STAGES),
    texts=st.lists(st.text(st.characters() | st.sampled_from("\ud800\udfff\x00\u200f\u202e")), min_size=5, max_size=5)
    | st.lists(st.text(min_size=3000, max_size=5000), min_size=5, max_size=5),
)
def test_dead_letter_headers_are_always_producible(stage, texts):
    """Whatever an event or an error held (lone surrogates, NUL, right-to-left marks, megabytes), every
    dead-letter header is valid UTF-8 and bounded, so the dead letter can be produced."""
    error_class, message, reason, topic, event_id = texts
    headers = DeadLetterHeaders.model_validate(
        {
            "error.stage": stage,
            "error.class": error_class,
            "error.message": message,
            "error.reason": reason,
            "error.attempts": "1",
            "source.topic": topic,
            "source.partition": "0",
            "source.offset": "7",
            "event.id": event_id,
        }
    )
    for name, value in headers.kafka_headers():
        assert isinstance(value, str)
        value.encode("utf-8")  # never raises
        assert len(value) <= (MAX_MESSAGE_CHARS if name == "error.message" else MAX_HEADER_CHARS)


def test_a_description_with_a_table_carries_it_as_data_and_one_without_says_why():
    table = (
        "Here are the steps:\n\n| № | Наименование действия | Роль |\n|---|---|---|\n| 1 | Подать заявку | Клиент |\n"
    )
    fields = description_fields(table)
    result = DiagramResult.model_validate({**fields, "id": "e", "metadata": METADATA})
    assert result.structured is not None and result.structured_error is None
    assert result.structured.steps is not None
    assert result.structured.steps[0].model_dump() == {"number": 1, "step": "Подать заявку", "role": "Клиент"}
    noise = DiagramResult.model_validate({**description_fields("6jjj cess"), "id": "e", "metadata": METADATA})
    assert noise.structured is None and noise.structured_error.startswith("no_table: ")
    assert json.loads(noise.model_dump_json())["structured"] is None


def test_an_adapter_this_replica_does_not_serve_is_refused_naming_the_known_ones():
    known = ("default", "bpmn", "uml")
    check_adapter(parse_event(event()), known)
    check_adapter(parse_event(event(adapter="uml")), known)
    with pytest.raises(ParseError) as refused:
        check_adapter(parse_event(event(adapter="swimlane")), known)
    assert refused.value.stage == "parse" and refused.value.reason == "unknown_adapter"
    assert "'swimlane'" in refused.value.message and "default, bpmn, uml" in refused.value.message
