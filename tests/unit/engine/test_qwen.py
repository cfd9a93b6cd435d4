"""The engine on the tiny Qwen3-VL: faithful batching, the adapter really applied, bad adapters refused.

Every test loads the model through the code that loads the real one (QwenVLEngine.load); outputs are
the random network's greedy tokens, compared exactly.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from consumer.engine.adapter_hash import adapter_hash
from consumer.engine.base import EngineLoadError, GenerationRequest
from consumer.engine.qwen import QwenVLEngine
from consumer.settings import Settings
from devtools.samples import sample_diagram
from devtools.tiny import CHAT_TEMPLATE, make_tiny_model

# Three shapes (landscape, portrait, wider) -> three visual-token counts, so a batch needs padding.
SIZES = [(320, 240), (336, 448), (480, 352)]
PROMPTS = ["Describe the diagram.", "List every step of this diagram as a markdown table with its role."]
MAX_NEW_TOKENS = 12


DTYPES = ["float32", "bfloat16"]


def load_engine(model_dir: Path, adapter_path: Path | None = None, **overrides) -> QwenVLEngine:
    overrides = {"device": "cpu", "torch_dtype": "float32", **overrides}
    settings = Settings.from_environ(
        {},
        base_model_id=str(model_dir),
        adapter_path=adapter_path if adapter_path is not None else model_dir / "adapter",
        max_new_tokens=MAX_NEW_TOKENS,
        **overrides,
    )
    engine = QwenVLEngine(settings)
    engine.load()
    return engine


def mixed_requests(count: int = 12) -> list[GenerationRequest]:
    """`count` different diagrams, three sizes, two prompts of different lengths."""
    return [
        GenerationRequest(image=sample_diagram(index, SIZES[index % len(SIZES)]), prompt=PROMPTS[index % 2])
        for index in range(count)
    ]


def texts(engine: QwenVLEngine, requests: list[GenerationRequest]) -> list[str]:
    return [generation.text for generation in engine.generate(requests).generations]


def adapter_copy(tiny_model: Path, destination: Path, rename=lambda key: key, keep=lambda key: True) -> Path:
    """A copy of the tiny model's adapter with its weight names rewritten or some weights dropped."""
    shutil.copytree(tiny_model / "adapter", destination)
    weights = load_file(destination / "adapter_model.safetensors")
    changed = {rename(key): tensor for key, tensor in weights.items() if keep(key)}
    save_file(changed, destination / "adapter_model.safetensors", metadata={"format": "pt"})
    return destination


@pytest.fixture(scope="module")
def engine(tiny_model) -> QwenVLEngine:
    """float32: the dtype whose guarantees every test below holds."""
    return load_engine(tiny_model)


@pytest.fixture(scope="module")
def bf16_engine(tiny_model) -> QwenVLEngine:
    return load_engine(tiny_model, torch_dtype="bfloat16")


def engine_in(dtype: str, request: pytest.FixtureRequest) -> QwenVLEngine:
    return request.getfixturevalue("engine" if dtype == "float32" else "bf16_engine")


# Seeds whose random networks answer differently for most of the 12 requests (some seeds repeat
# one token whatever the image, which would make the equality test prove little).
@pytest.fixture(scope="module", params=[0, 3, 5], ids=lambda seed: f"seed{seed}")
def seeded_model(request, tiny_model, tmp_path_factory) -> Path:
    if request.param == 0:
        return tiny_model
    directory = tmp_path_factory.mktemp(f"tiny-model-seed{request.param}")
    make_tiny_model(directory, seed=request.param)
    return directory


# -- batching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_greedy_output_equals_one_at_a_time(seeded_model, dtype):
    seeded_engine = load_engine(seeded_model, torch_dtype=dtype)
    requests = mixed_requests(12)
    alone = [seeded_engine.generate([request]).generations[0] for request in requests]
    # The outputs must depend on the image and prompt, or equality below would prove nothing.
    assert len({generation.text for generation in alone}) >= 8, [g.text for g in alone]

    batched = seeded_engine.generate(requests).generations
    assert [g.text for g in batched] == [g.text for g in alone]
    assert [g.output_tokens for g in batched] == [g.output_tokens for g in alone]
    assert all(0 < g.output_tokens <= MAX_NEW_TOKENS for g in batched)

    # Another grouping (reversed, in two uneven batches) gives the same text again.
    reordered = list(reversed(requests))
    regrouped = texts(seeded_engine, reordered[:5]) + texts(seeded_engine, reordered[5:])
    assert regrouped == [g.text for g in reversed(alone)]


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_batched_next_token_scores_match_one_at_a_time(dtype, request):
    """Stronger than equal argmax: every next-token score, bit for bit (more in test_invariant.py)."""
    engine = engine_in(dtype, request)
    assert engine.decoder is not None
    prompts = [engine.collate([request]) for request in mixed_requests(6)]
    batched = engine.decoder.trace(prompts, steps=2)
    for prompt, row in zip(prompts, batched, strict=True):
        assert torch.equal(engine.decoder.trace([prompt], steps=2)[0], row)


@torch.inference_mode()
def test_padded_batches_keep_float32_scores_within_1e_4(tiny_model):
    """BATCH_INVARIANT=false, float32: left padding moves next-token scores by rounding only."""
    padded = load_engine(tiny_model, batch_invariant=False)
    requests = mixed_requests(6)
    batched_logits = padded.model(**padded.collate(requests)).logits[:, -1]
    for row, request in enumerate(requests):
        alone_logits = padded.model(**padded.collate([request])).logits[:, -1]
        torch.testing.assert_close(batched_logits[row : row + 1], alone_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_images_prepared_ahead_give_the_same_output(dtype, request):
    engine = engine_in(dtype, request)
    requests = mixed_requests(6)
    expected = texts(engine, requests)
    # Half prepared (as the pipeline's fetch threads do), half not: one batch, same text.
    mixed = [
        GenerationRequest(request.image, request.prompt, engine.prepare_image(request.image) if index % 2 else None)
        for index, request in enumerate(requests)
    ]
    assert texts(engine, mixed) == expected


def test_collate_builds_exactly_the_processors_tensors(engine):
    requests = mixed_requests(6)
    reference = engine.processor(
        text=[engine.prompt_text(request.prompt) for request in requests],
        images=[request.image for request in requests],
        padding=True,
        return_tensors="pt",
    )
    collated = engine.collate(requests)
    assert set(collated) == set(reference.keys())
    for name, tensor in reference.items():
        assert torch.equal(collated[name], tensor), name
    assert len(set(reference["image_grid_thw"].prod(dim=1).tolist())) == len(SIZES)
    assert (reference["attention_mask"] == 0).any()  # left padding happened


def test_image_max_pixels_bounds_the_visual_tokens(tiny_model):
    bounded = load_engine(tiny_model, image_max_pixels=128 * 32 * 32)
    features = bounded.image_features(sample_diagram(0, (1600, 1200)))
    patches = int(features.image_grid_thw.prod())
    assert patches // 4 <= 128  # visual tokens = patches / merge_size**2


def test_a_prompt_carrying_the_image_placeholder_is_refused(engine):
    request = GenerationRequest(sample_diagram(0, SIZES[0]), "Describe <|image_pad|> this.")
    with pytest.raises(ValueError, match="must not contain"):
        engine.generate([request])


# -- the adapter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_is_merged_and_changes_the_output(dtype, request, tiny_model, tmp_path):
    engine = engine_in(dtype, request)
    base = load_engine(tiny_model, adapter_path=tmp_path / "empty", torch_dtype=dtype)
    assert base.info.adapter is None
    assert engine.info.adapter == str(tiny_model / "adapter")
    assert engine.info.adapter_hash == adapter_hash(tiny_model / "adapter") and base.info.adapter_hash is None
    # Merged: no LoRA modules are left to cost time at every token.
    assert not any("lora" in name for name, _ in engine.model.named_parameters())

    requests = mixed_requests(6)
    with_adapter, without = texts(engine, requests), texts(base, requests)
    assert sum(a != b for a, b in zip(with_adapter, without, strict=False)) >= 4, (with_adapter, without)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # peft's warning: what this test turns into an error
@pytest.mark.parametrize(
    "case, rename, keep",
    [
        # The known trap: an adapter saved against the older layout (no `language_model` level).
        ("older-module-layout", lambda key: key.replace("model.language_model.layers", "model.layers"), None),
        # Trained for a one-layer model: the second layer's weights are missing.
        ("fewer-layers", None, lambda key: ".layers.1." not in key),
        # Trained for a deeper model: weights for a layer this model does not have.
        ("more-layers", lambda key: key.replace(".layers.1.", ".layers.7."), None),
    ],
)
def test_adapter_that_does_not_fit_stops_the_load(tiny_model, tmp_path, case, rename, keep):
    adapter = adapter_copy(tiny_model, tmp_path / case, rename or (lambda key: key), keep or (lambda key: True))
    with pytest.raises(EngineLoadError, match="does not fit") as refused:
        load_engine(tiny_model, adapter_path=adapter)
    assert str(adapter) in str(refused.value)


def test_adapter_directory_chat_template_reaches_the_model(engine, tiny_model, tmp_path):
    adapter = tmp_path / "adapter-with-template"
    shutil.copytree(tiny_model / "adapter", adapter)
    system = "<|im_start|>system\nYou transcribe business process diagrams.<|im_end|>\n"
    (adapter / "chat_template.jinja").write_text(system + CHAT_TEMPLATE)
    templated = load_engine(tiny_model, adapter_path=adapter)

    assert templated.prompt_text(PROMPTS[0]).startswith(system)
    assert system not in engine.prompt_text(PROMPTS[0])
    assert PROMPTS[0] in templated.prompt_text(PROMPTS[0])
    requests = mixed_requests(6)
    assert texts(templated, requests) != texts(engine, requests)


# -- device and dtype --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_explicit_dtype_is_what_the_model_runs_in(tiny_model, dtype):
    explicit = load_engine(tiny_model, device="cpu", torch_dtype=dtype)
    assert explicit.info.device == "cpu" and explicit.info.dtype == dtype
    assert {parameter.dtype for parameter in explicit.model.parameters()} == {getattr(torch, dtype)}
    [generation] = explicit.generate(mixed_requests(1)).generations
    assert generation.output_tokens > 0


def test_auto_dtype_is_the_one_resolve_dtype_picks_here(tiny_model):
    from consumer.engine.device import dtype_name, resolve_dtype

    auto = load_engine(tiny_model, torch_dtype="auto")
    assert auto.info.device == "cpu"
    assert auto.info.dtype == dtype_name(resolve_dtype("auto", "cpu"))


def test_quantization_is_refused_without_cuda(tiny_model):
    with pytest.raises(EngineLoadError, match="QUANTIZATION=int8 needs bitsandbytes on a CUDA device"):
        load_engine(tiny_model, device="cpu", quantization="int8")


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_and_dynamic_kv_cache_give_the_same_text(dtype, tiny_model):
    """KV_CACHE (BATCH_INVARIANT=false) changes how the cache is stored (auto: static on cpu), not the text."""
    engine = load_engine(tiny_model, batch_invariant=False, torch_dtype=dtype)
    assert engine.kv_cache_implementation() == "static"
    dynamic = load_engine(tiny_model, batch_invariant=False, kv_cache="dynamic", torch_dtype=dtype)
    assert dynamic.kv_cache_implementation() == "dynamic"
    requests = mixed_requests(6)
    assert texts(engine, requests) == texts(dynamic, requests)


def test_onednn_decode_matmuls_give_the_same_text(engine, tiny_model):
    """DECODE_MATMUL (auto: oneDNN for few-row float32 matmuls on cpu) changes speed, never the text."""
    from consumer.engine.onednn import FewRowsLinear, available

    if not available():
        pytest.skip("this PyTorch build has no oneDNN")
    routed = [m for m in engine.model.modules() if isinstance(m, FewRowsLinear)]
    assert routed and engine.model.lm_head in routed
    default = load_engine(tiny_model, decode_matmul="default")
    assert not any(isinstance(m, FewRowsLinear) for m in default.model.modules())
    requests = mixed_requests(6)
    assert texts(engine, requests) == texts(default, requests)


def test_onednn_linear_equals_nn_linear_at_decode_and_prefill_rows():
    """Both paths of FewRowsLinear (oneDNN up to ROWS_LIMIT rows, nn.Linear above) compute x W^T + b."""
    from consumer.engine import onednn

    if not onednn.available():
        pytest.skip("this PyTorch build has no oneDNN")
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40)
    reference = torch.nn.Linear(96, 40)
    reference.load_state_dict(layer.state_dict())
    assert onednn.route_few_rows_to_onednn(layer) == 1
    with torch.inference_mode():
        for rows in (1, 3, onednn.ROWS_LIMIT, onednn.ROWS_LIMIT + 1):
            x = torch.randn(rows, 1, 96)
            torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


def test_onednn_refused_where_it_cannot_run(tiny_model):
    with pytest.raises(EngineLoadError, match="DECODE_MATMUL=onednn needs a float32 model on a CPU"):
        load_engine(tiny_model, device="cpu", torch_dtype="bfloat16", decode_matmul="onednn")


def test_static_cache_attention_reads_only_the_filled_positions(tiny_model, monkeypatch):
    """KV_CACHE=static preallocates prompt + MAX_NEW_TOKENS positions; attention sees only those filled."""
    from consumer.engine.kv_cache import FilledStaticLayer

    engine = load_engine(tiny_model, batch_invariant=False)
    calls: list[tuple[object, int, int]] = []  # (layer, positions attention got, positions preallocated)
    update = FilledStaticLayer.update

    def spy(layer, *args, **kwargs):
        keys, values = update(layer, *args, **kwargs)
        calls.append((layer, keys.shape[-2], layer.keys.shape[-2]))
        return keys, values

    monkeypatch.setattr(FilledStaticLayer, "update", spy)
    [request] = mixed_requests(1)
    prompt_length = engine.collate([request])["input_ids"].shape[1]
    engine.generate([request])
    first_layer = calls[0][0]
    seen = [(got, preallocated) for layer, got, preallocated in calls if layer is first_layer]
    assert seen[0] == (prompt_length, prompt_length + MAX_NEW_TOKENS)
    assert [length for length, _ in seen] == list(range(prompt_length, prompt_length + len(seen)))
    assert len(seen) > 1


def test_torch_compile_gives_the_same_text(engine, tiny_model):
    """TORCH_COMPILE=true (torch.compile of the forward; on a CPU without the oneDNN routing) changes speed only."""
    compiled = load_engine(tiny_model, torch_compile=True)
    from consumer.engine.onednn import FewRowsLinear

    assert not any(isinstance(m, FewRowsLinear) for m in compiled.model.modules())
    requests = mixed_requests(2)  # two images of two sizes: a padded batch
    assert texts(compiled, requests) == texts(engine, requests)


def test_onednn_and_torch_compile_together_are_refused(tiny_model):
    with pytest.raises(EngineLoadError, match="DECODE_MATMUL=onednn cannot be combined with TORCH_COMPILE"):
        load_engine(tiny_model, device="cpu", torch_compile=True, decode_matmul="onednn")


def test_torch_compile_compiles_the_forward_generate_runs(tiny_model, monkeypatch):
    """QUANTIZATION keeps the adapter unmerged (a PeftModel), whose generate never calls PeftModel.forward."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from consumer.engine.qwen import compile_forward

    compiled_calls: list[str] = []

    def fake_compile(function, **options):
        @functools.wraps(function)  # as torch.compile's wrapper: generate reads the forward's signature
        def compiled(*args, **kwargs):
            compiled_calls.append(function.__qualname__)
            return function(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    peft_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_model), str(tiny_model / "adapter")
    ).eval()
    compile_forward(peft_model)
    inputs = load_engine(tiny_model).collate(mixed_requests(1))
    with torch.inference_mode():
        peft_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert compiled_calls and set(compiled_calls) == {"Qwen3VLForConditionalGeneration.forward"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_patch_embedding_is_a_matmul_computing_what_the_convolution_does(dtype, request):
    """The vision encoder's Conv3d patch embedding, swapped at load for the same product as F.linear."""
    from consumer.engine.qwen import PatchEmbedding

    engine = engine_in(dtype, request)
    embedding = engine.model.model.visual.patch_embed.proj
    assert type(embedding) is PatchEmbedding
    generator = torch.Generator().manual_seed(0)
    shape = (40, *embedding.weight.shape[1:2], *embedding.kernel_size)
    patches = torch.randn(shape, generator=generator).to(embedding.weight.dtype)
    with torch.inference_mode():
        as_matmul = embedding(patches)
        as_convolution = torch.nn.Conv3d.forward(embedding, patches)
    # The same sums in another order: float32 rounding over 1,536 products, or bfloat16's 8-bit mantissa.
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(as_matmul, as_convolution, atol=tolerance, rtol=tolerance)
