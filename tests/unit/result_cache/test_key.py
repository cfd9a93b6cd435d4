"""The result key: what changes it (anything that changes the description) and what does not."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from consumer.engine.adapter_hash import adapter_hash
from consumer.engine.base import EngineInfo
from consumer.result_cache.key import ResultKeyer, content_hash, model_fingerprint
from consumer.settings import Settings

IMAGE = content_hash(b"\x89PNG one diagram")
PROMPT = "Describe this diagram"


def info(model: str = "Qwen/Qwen3-VL-2B-Instruct", adapter: str | None = None, **changes: object) -> EngineInfo:
    """A loaded engine's info; with `adapter`, its content hash as the engine computes it when loading."""
    fields: dict = dict(model=model, adapter=adapter, device="cpu", dtype="bfloat16", backend="transformers")
    fields["adapter_hash"] = adapter_hash(adapter)
    fields.update({"model_load_time": 1.0, "default_batch_size": 16, **changes})
    return EngineInfo(**fields)


def keyer(settings: Settings | None = None, engine: EngineInfo | None = None) -> ResultKeyer:
    return ResultKeyer.for_engine(settings or Settings.from_environ({}), engine or info())


def make_model(directory: Path, config: dict | None = None, weights: dict[str, int] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "qwen3_vl"}))
    for name, size in (weights or {"model.safetensors": 1000}).items():
        (directory / name).write_bytes(b"w" * size)
    return directory


def make_adapter(directory: Path, weights: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text('{"r": 8}')
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def test_content_hash_is_the_sha256_of_the_bytes():
    assert content_hash(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_the_same_inputs_give_the_same_key():
    assert keyer().key(IMAGE, PROMPT) == keyer().key(IMAGE, PROMPT)
    assert len(keyer().key(IMAGE, PROMPT)) == 64


def test_image_and_prompt_change_it():
    base = keyer().key(IMAGE, PROMPT)
    assert keyer().key(content_hash(b"\x89PNG another diagram"), PROMPT) != base
    assert keyer().key(IMAGE, PROMPT + " in Russian") != base


def test_generation_settings_and_dtype_change_it():
    base = keyer().key(IMAGE, PROMPT)
    for changes in ({"max_new_tokens": 512}, {"image_min_pixels": 128 * 32 * 32}, {"image_max_pixels": 512 * 32 * 32}):
        assert keyer(Settings.from_environ({}, **changes)).key(IMAGE, PROMPT) != base, changes
    assert keyer(engine=info(dtype="float32")).key(IMAGE, PROMPT) != base


def test_the_model_id_changes_it():
    assert keyer(engine=info(model="Qwen/Qwen3-VL-4B-Instruct")).key(IMAGE, PROMPT) != keyer().key(IMAGE, PROMPT)


def test_a_local_model_is_its_config_and_its_weight_files(tmp_path):
    """Same path, other contents: another key. The weights' bytes are not read (gigabytes), their sizes are."""
    path = tmp_path / "model"
    make_model(path)
    first = keyer(engine=info(model=str(path))).key(IMAGE, PROMPT)
    make_model(path, config={"model_type": "qwen3_vl", "num_hidden_layers": 2})
    second = keyer(engine=info(model=str(path))).key(IMAGE, PROMPT)
    make_model(path, config={"model_type": "qwen3_vl", "num_hidden_layers": 2}, weights={"model.safetensors": 999})
    third = keyer(engine=info(model=str(path))).key(IMAGE, PROMPT)
    assert len({first, second, third}) == 3
    (path / "README.md").write_text("notes")
    (path / "generation_config.json").write_text("{}")
    assert keyer(engine=info(model=str(path))).key(IMAGE, PROMPT) == third
    assert model_fingerprint("Qwen/Qwen3-VL-2B-Instruct") is None


def test_the_adapter_content_changes_it_not_its_path(tmp_path):
    first = make_adapter(tmp_path / "a", b"\x01" * 64)
    same = make_adapter(tmp_path / "b", b"\x01" * 64)
    other = make_adapter(tmp_path / "c", b"\x02" * 64)
    with_first = keyer(engine=info(adapter=str(first))).key(IMAGE, PROMPT)
    assert keyer(engine=info(adapter=str(same))).key(IMAGE, PROMPT) == with_first
    assert keyer(engine=info(adapter=str(other))).key(IMAGE, PROMPT) != with_first
    assert keyer().key(IMAGE, PROMPT) != with_first  # the base model alone


def test_an_adapter_run_unmerged_under_adapters_has_keys_of_its_own(tmp_path):
    adapter = make_adapter(tmp_path / "a", b"\x01" * 64)
    merged = keyer(engine=info(adapter=str(adapter)))
    unmerged = keyer(Settings.from_environ({}, adapters=(("b", tmp_path / "b"),)), info(adapter=str(adapter)))
    assert unmerged.key(IMAGE, PROMPT) != merged.key(IMAGE, PROMPT)
    assert unmerged.key(IMAGE, PROMPT, "hash-b") != unmerged.key(IMAGE, PROMPT)  # each adapter by its content


def test_what_does_not_change_it():
    """The device, the batch size, the topics and the event's own fields are not part of what is described."""
    base = keyer().key(IMAGE, PROMPT)
    assert keyer(engine=info(device="cuda", default_batch_size=8)).key(IMAGE, PROMPT) == base
    unrelated = Settings.from_environ(
        {}, batch_size=4, output_topic="elsewhere", fetch_workers=8, result_cache_topic="cache", max_in_flight=3
    )
    assert keyer(unrelated).key(IMAGE, PROMPT) == base


@given(st.binary(max_size=64), st.text(max_size=64), st.binary(max_size=64), st.text(max_size=64))
def test_different_images_or_prompts_never_share_a_key(image_a, prompt_a, image_b, prompt_b):
    same = content_hash(image_a) == content_hash(image_b) and prompt_a == prompt_b
    k = keyer()
    assert (k.key(content_hash(image_a), prompt_a) == k.key(content_hash(image_b), prompt_b)) == same


def test_every_field_is_in_the_key():
    """A field added to ResultKeyer that key() forgets would make different results share a key."""
    base = keyer()
    for field in dataclasses.fields(ResultKeyer):
        value = getattr(base, field.name)
        changed = dataclasses.replace(base, **{field.name: (value or 0) + 1 if isinstance(value, int) else f"{value}x"})
        assert changed.key(IMAGE, PROMPT) != base.key(IMAGE, PROMPT), field.name
