"""ADAPTERS on the tiny Qwen3-VL: each image runs on the adapter it names, a batch mixing adapters gives
the texts of unmixed batches, results name their adapter, and an adapter is reloaded without a restart
(a reload that fails keeps the old one).

The tiny model's two adapters (DIR/adapter, DIR/adapter-b) differ in their lora_B weights only.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from consumer.engine.adapter_hash import adapter_hash
from consumer.engine.base import EngineLoadError, GenerationRequest
from consumer.engine.qwen import QwenVLEngine
from devtools.tiny import SECOND_ADAPTER
from tests.unit.engine.test_qwen import DTYPES, adapter_copy, load_engine, mixed_requests, texts


def load_with_adapters(model_dir: Path, second: Path | None = None, **overrides) -> QwenVLEngine:
    return load_engine(model_dir, adapters=(("b", second or model_dir / SECOND_ADAPTER),), **overrides)


def on(adapter: str, requests: list[GenerationRequest]) -> list[GenerationRequest]:
    return [GenerationRequest(r.image, r.prompt, r.prepared, adapter=adapter) for r in requests]


@pytest.fixture(scope="module")
def multi(tiny_model) -> QwenVLEngine:
    return load_with_adapters(tiny_model)


@pytest.fixture(scope="module")
def multi_bf16(tiny_model) -> QwenVLEngine:
    return load_with_adapters(tiny_model, torch_dtype="bfloat16")


def multi_in(dtype: str, request: pytest.FixtureRequest) -> QwenVLEngine:
    return request.getfixturevalue("multi" if dtype == "float32" else "multi_bf16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_same_image_under_default_and_b_gives_different_texts_named_by_adapter(dtype, request, tiny_model):
    engine = multi_in(dtype, request)
    assert engine.info.adapter_names == ("default", "b") and engine.info.adapter == str(tiny_model / "adapter")
    requests = mixed_requests(6)
    under_default = engine.generate(on("default", requests)).generations
    under_b = engine.generate(on("b", requests)).generations
    differing = sum(a.text != b.text for a, b in zip(under_default, under_b, strict=True))
    assert differing >= 4, ([g.text for g in under_default], [g.text for g in under_b])
    for generations, name, path in ((under_default, "default", "adapter"), (under_b, "b", SECOND_ADAPTER)):
        versions = {generation.adapter for generation in generations}
        assert versions == {engine.adapter_version(name)}
        (version,) = versions
        assert (version.name, version.path, version.hash) == (
            name,
            str(tiny_model / path),
            adapter_hash(tiny_model / path),
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_batch_mixing_adapters_gives_the_texts_of_unmixed_batches(dtype, request):
    engine = multi_in(dtype, request)
    requests = mixed_requests(8)
    mixed = [on("b" if index % 3 == 1 else "default", [r])[0] for index, r in enumerate(requests)]
    together = engine.generate(mixed).generations
    unmixed = {name: iter(texts(engine, [r for r in mixed if r.adapter == name])) for name in ("default", "b")}
    assert [g.text for g in together] == [next(unmixed[r.adapter]) for r in mixed]
    assert [g.adapter.name for g in together if g.adapter] == [r.adapter for r in mixed]
    assert [texts(engine, [r])[0] for r in reversed(mixed)] == [g.text for g in reversed(together)]


def test_the_multi_adapter_mode_passes_the_batch_invariance_check_at_warm_up(multi):
    assert multi.warm_up() > 0


def test_an_adapter_the_engine_does_not_serve_is_refused(multi):
    with pytest.raises(ValueError, match=r"unknown adapter \['uml'\]; this engine has \['b', 'default'\]"):
        multi.generate(on("uml", mixed_requests(1)))


def test_without_an_adapter_at_adapter_path_default_runs_the_base_model(tiny_model, tmp_path, multi):
    engine = load_with_adapters(tiny_model, adapter_path=tmp_path / "empty")
    base = load_engine(tiny_model, adapter_path=tmp_path / "empty")
    assert engine.adapter_version("default").path is None and engine.info.adapter is None
    requests = mixed_requests(4)
    assert texts(engine, requests) == texts(base, requests)
    assert texts(engine, on("b", requests)) == texts(multi, on("b", requests))


# -- reloading ---------------------------------------------------------------------------------------


@pytest.fixture
def reloadable(tiny_model, tmp_path) -> tuple[QwenVLEngine, Path]:
    """An engine whose adapter b is a copy of adapter-b in tmp_path, free to be replaced."""
    second = tmp_path / "b"
    shutil.copytree(tiny_model / SECOND_ADAPTER, second)
    return load_with_adapters(tiny_model, second), second


def replace_content(directory: Path, source: Path) -> None:
    shutil.rmtree(directory)
    shutil.copytree(source, directory)


def test_a_reloaded_adapter_is_used_by_the_next_call_and_named_by_its_new_hash(reloadable, tiny_model, multi):
    engine, second = reloadable
    requests = mixed_requests(4)
    before = texts(engine, on("b", requests))
    assert before == texts(multi, on("b", requests))
    replace_content(second, tiny_model / "adapter")
    version = engine.reload_adapter("b")
    assert version.hash == adapter_hash(tiny_model / "adapter") == engine.adapter_version("b").hash
    after = engine.generate(on("b", requests)).generations
    assert [g.text for g in after] == texts(multi, on("default", requests)) != before
    assert {g.adapter for g in after} == {version}
    assert len(engine.model.peft_config) == 2, "the old content of b is dropped"


def test_a_call_in_flight_finishes_before_a_reload_swaps_the_weights(reloadable, tiny_model):
    engine, second = reloadable
    old = engine.adapter_version("b")
    replace_content(second, tiny_model / "adapter")
    swapped = threading.Event()
    with engine._model_lock:  # what a generate call holds throughout
        worker = threading.Thread(target=lambda: (engine.reload_adapter("b"), swapped.set()))
        worker.start()
        time.sleep(0.5)
        assert not swapped.is_set() and engine.adapter_version("b") == old
    worker.join(30)
    assert swapped.is_set() and engine.adapter_version("b") != old


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
@pytest.mark.parametrize(
    "case, breaks, message",
    [
        ("keys that do not fit", "fewer-layers", "does not fit"),
        ("unreadable weights", "garbage", "cannot load LoRA adapter 'b'"),
        ("no adapter any more", "removed", "no LoRA adapter"),
    ],
)
def test_a_broken_reload_keeps_the_old_adapter(reloadable, tiny_model, tmp_path, case, breaks, message):
    engine, second = reloadable
    requests = mixed_requests(4)
    old, before = engine.adapter_version("b"), texts(engine, on("b", requests))
    if breaks == "fewer-layers":
        broken = adapter_copy(tiny_model, tmp_path / "broken", keep=lambda key: ".layers.1." not in key)
        replace_content(second, broken)
    elif breaks == "garbage":
        (second / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    else:
        shutil.rmtree(second)
    with pytest.raises(EngineLoadError, match=message):
        engine.reload_adapter("b")
    assert engine.adapter_version("b") == old
    assert texts(engine, on("b", requests)) == before
    assert len(engine.model.peft_config) == 2, "a failed load leaves nothing behind"


def test_a_merged_adapter_is_reloaded_by_building_the_model_again(tiny_model, tmp_path):
    default = tmp_path / "default"
    shutil.copytree(tiny_model / "adapter", default)
    engine = load_engine(tiny_model, adapter_path=default)
    merged_b = load_engine(tiny_model, adapter_path=tiny_model / SECOND_ADAPTER)
    requests = mixed_requests(4)
    before = texts(engine, requests)
    replace_content(default, tiny_model / SECOND_ADAPTER)
    version = engine.reload_adapter("default")
    assert version.hash == adapter_hash(tiny_model / SECOND_ADAPTER)
    assert not any("lora" in name for name, _ in engine.model.named_parameters()), "still merged"
    assert texts(engine, requests) == texts(merged_b, requests) != before
