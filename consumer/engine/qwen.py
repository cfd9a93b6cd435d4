"""Qwen3-VL + LoRA through transformers and peft: the engine the service runs.

Load once: base model from BASE_MODEL_ID (hub id or local directory), the LoRA adapter from
ADAPTER_PATH merged into the weights (no per-token adapter cost), or with ADAPTERS every adapter
unmerged, each call running on one (consumer/engine/lora.py); the processor from the adapter
directory where it carries one (the old service did this), else from the base model. An adapter is
loaded again while serving by `reload_adapter` (consumer/engine/reload.py decides when). Generation is
greedy. By default (BATCH_INVARIANT) each image's text depends on that image and its prompt alone,
in every dtype: consumer/engine/invariant.py. With BATCH_INVARIANT=false a batch goes through
transformers' generate with left padding, which in float32 gave the same text as one image at a
time and in bfloat16 did not.

The processor's work is split in two so the per-image part can run off the model thread:
`prepare_image` resizes, normalises and patchifies one image (what the image processor does), and
`collate` expands each prompt's image placeholder and tokenizes the batch. Together they build
exactly the tensors `processor(text=..., images=..., padding=True)` builds (a test holds them equal).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from consumer.engine import onednn
from consumer.engine.adapter_hash import adapter_hash
from consumer.engine.adapters import DEFAULT_ADAPTER, AdapterVersion
from consumer.engine.base import (
    EngineInfo,
    EngineLoadError,
    Generation,
    GenerationBatch,
    GenerationRequest,
    ImageFeatures,
)
from consumer.engine.device import (
    CpuFlavour,
    attention_implementation,
    cpu_flavour,
    decode_row_blocks,
    default_batch_size,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from consumer.engine.invariant import InvariantDecoder
from consumer.engine.kv_cache import FilledStaticCache
from consumer.engine.lora import AdapterSet, adapter_present, check_adapter_keys

if TYPE_CHECKING:
    from consumer.settings import Settings

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class PatchEmbedding(torch.nn.Conv3d):
    """The vision encoder's patch embedding as the matrix multiply it is.

    Qwen3-VL embeds each 2x16x16 patch with a Conv3d whose kernel is its stride: every output is one
    patch's pixels times the kernel. On CPUs PyTorch runs that convolution 10-50x slower than the
    same product as a matmul (1.5 s of a 1024x768 image's prefill in bfloat16 on one core, measured:
    bench/README.md), so an input of exactly one kernel per patch goes through F.linear instead.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - Conv3d's own name
        if input.dim() == 5 and tuple(input.shape[2:]) == tuple(self.kernel_size):
            flat = F.linear(input.flatten(1), self.weight.flatten(1), self.bias)
            return flat.view(input.shape[0], self.out_channels, 1, 1, 1)
        result: torch.Tensor = super().forward(input)
        return result


def route_patch_embedding(model: torch.nn.Module) -> int:
    """Make every patch-embedding Conv3d of `model` (kernel = stride, no padding) a PatchEmbedding."""
    converted = 0
    for module in model.modules():
        if (
            type(module) is torch.nn.Conv3d
            and tuple(module.kernel_size) == tuple(module.stride)
            and tuple(module.padding) == (0, 0, 0)
            and tuple(module.dilation) == (1, 1, 1)
            and module.groups == 1
        ):
            module.__class__ = PatchEmbedding
            converted += 1
    return converted


def compile_forward(model: Any) -> None:
    """TORCH_COMPILE: compile the forward that generation calls, in place.

    With QUANTIZATION the adapter stays unmerged and `model` is a PeftModel; its generate hands over to
    the underlying transformers model, whose own forward runs every step. PeftModel.forward is never
    called there, so compiling it (as this did) compiled nothing that ran.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    logger.info("TORCH_COMPILE=1: compiling %s.forward (first batches will be slow)", type(target).__name__)
    target.forward = torch.compile(target.forward, dynamic=True)


class QwenVLEngine:
    """Qwen3-VL (any AutoModelForImageTextToText checkpoint) with an optional merged LoRA adapter, or with
    ADAPTERS several unmerged ones; model calls and adapter swaps take turns on one lock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.info: EngineInfo | None = None
        """Set by `load` (or `from_model`)."""
        self.model: Any = None
        self.processor: Any = None
        self.decoder: InvariantDecoder | None = None
        """Set at load unless BATCH_INVARIANT=false."""
        self.adapters: dict[str, AdapterVersion] = {DEFAULT_ADAPTER: AdapterVersion(DEFAULT_ADAPTER, None, None)}
        """The adapter version each name runs on now; replaced whole by a reload, so any thread may read it."""
        self.adapter_set: AdapterSet | None = None
        """ADAPTERS set: every adapter in the model, unmerged. None: the default adapter merged (or none)."""
        self._model_lock = threading.Lock()
        """Held by every model call and by a reload's swap, so a call runs on one set of weights throughout."""
        self._placement: tuple[str, torch.dtype, str | None] | None = None
        """The device, dtype and hub token `load` used: a reload of a merged adapter loads the base again."""

    @classmethod
    def from_model(cls, settings: Settings, model: Any, processor: Any) -> QwenVLEngine:
        """An engine over a base model built in memory instead of loaded (bench/: random weights), with
        ADAPTER_PATH merged or ADAPTERS attached as `load` does (none where ADAPTER_PATH holds no adapter)."""
        engine = cls(settings)
        if settings.adapters:
            engine.adapter_set = AdapterSet(settings.adapter_paths())
        model, engine.adapters = engine._with_adapters(model)
        engine.model = model.eval()
        engine.processor = engine.configure_processor(processor)
        device = model.device.type
        route_patch_embedding(model)
        engine._route_decode_matmuls(model)
        engine.decoder = engine._invariant_decoder(model)
        engine.info = EngineInfo(
            model=settings.base_model_id,
            adapter=engine.adapters[DEFAULT_ADAPTER].path,
            device=device,
            dtype=dtype_name(model.dtype),
            backend="transformers",
            model_load_time=0.0,
            default_batch_size=default_batch_size(device, engine._flavour(device), model.dtype),
            adapter_names=tuple(engine.adapters),
            adapter_hash=engine.adapters[DEFAULT_ADAPTER].hash,
        )
        return engine

    # -- load -------------------------------------------------------------------------------
    def load(self) -> EngineInfo:
        settings = self.settings
        started = time.perf_counter()
        device = resolve_device(settings.device)
        try:
            dtype = resolve_dtype(settings.torch_dtype, device)
        except ValueError as exc:
            raise EngineLoadError(str(exc)) from exc
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        self._placement = (device, dtype, token)
        if settings.adapters:
            self.adapter_set = AdapterSet(settings.adapter_paths())
        self.model, self.adapters = self._build_model()
        self.decoder = self._invariant_decoder(self.model)
        self.processor = self._load_processor(Path(settings.adapter_path), token)
        adapter = self.adapters[DEFAULT_ADAPTER]
        self.info = EngineInfo(
            model=settings.base_model_id,
            adapter=adapter.path,
            device=device,
            dtype=dtype_name(dtype),
            backend="transformers",
            model_load_time=round(time.perf_counter() - started, 3),
            default_batch_size=default_batch_size(device, self._flavour(device), dtype),
            adapter_names=tuple(self.adapters),
            adapter_hash=adapter.hash,
        )
        logger.info("model ready in %.2f s (adapter: %s)", self.info.model_load_time, adapter.path)
        return self.info

    def _build_model(self) -> tuple[Any, dict[str, AdapterVersion]]:
        """The base model from BASE_MODEL_ID with its adapters (merged, or with ADAPTERS unmerged), on its
        device and ready to run; and the adapter version of each name."""
        from transformers import AutoModelForImageTextToText

        settings = self.settings
        assert self._placement is not None
        device, dtype, token = self._placement
        logger.info("loading base model %s on %s as %s", settings.base_model_id, device, dtype_name(dtype))
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                settings.base_model_id,
                dtype=dtype,
                attn_implementation=attention_implementation(device, dtype),
                token=token,
                **self._quantization_kwargs(device),
            )
        except Exception as exc:
            raise EngineLoadError(f"cannot load base model {settings.base_model_id!r}: {exc}") from exc

        model, versions = self._with_adapters(model)
        if getattr(model, "hf_device_map", None) is None and not settings.quantization:
            model = model.to(device)
        model.eval()
        route_patch_embedding(model)
        self._route_decode_matmuls(model)
        if settings.torch_compile:
            compile_forward(model)
        return model, versions

    def _with_adapters(self, model: Any) -> tuple[Any, dict[str, AdapterVersion]]:
        """`model` with ADAPTER_PATH merged into it, or with ADAPTERS every adapter unmerged; each name's version."""
        if self.adapter_set is not None:
            return self.adapter_set.attach(model), dict(self.adapter_set.versions)
        adapter_path = Path(self.settings.adapter_path)
        version = AdapterVersion(DEFAULT_ADAPTER, None, None)
        if adapter_present(adapter_path):
            content = adapter_hash(adapter_path)
            model = self._merge_adapter(model, adapter_path)
            version = AdapterVersion(DEFAULT_ADAPTER, str(adapter_path), content)
        else:
            logger.warning("no LoRA adapter at %s: running the base model alone (adapter: null)", adapter_path)
        return model, {DEFAULT_ADAPTER: version}

    # -- reload ------------------------------------------------------------------------------
    def adapter_version(self, name: str) -> AdapterVersion:
        """The version adapter `name` runs on now (KeyError for a name this engine does not serve)."""
        return self.adapters[name]

    def reload_adapter(self, name: str) -> AdapterVersion:
        """Load adapter `name` again from its directory; model calls after this one returns use it, the call
        in flight finishes on the old weights. Raises EngineLoadError with the cause, the old adapter
        still in use, when the directory holds no adapter or one that cannot be loaded.

        With ADAPTERS, only the adapter's own weights are loaded (beside the old ones until the swap), and
        model calls wait meanwhile. A merged adapter cannot be taken out of the weights exactly (in bfloat16
        W + BA - BA is not W), so the default adapter alone is reloaded by building the whole model again
        from BASE_MODEL_ID while the old one serves: a full load's time, and two models in memory until the
        swap (docs/operations.md)."""
        if self.adapter_set is not None:
            with self._model_lock:
                version = self.adapter_set.replace(name)
                self._route_decode_matmuls(self.model)  # the new adapter's layers, as the others at load
                self.adapters = {**self.adapters, name: version}
            return version
        path = Path(self.settings.adapter_path)
        if name != DEFAULT_ADAPTER or not adapter_present(path):
            raise EngineLoadError(f"no LoRA adapter (adapter_config.json) at {path}")
        model, versions = self._build_model()
        version = versions[DEFAULT_ADAPTER]
        if version.path is None or adapter_hash(path) != version.hash:
            raise EngineLoadError(f"the adapter at {path} changed while it was being loaded")
        decoder = self._invariant_decoder(model)
        with self._model_lock:
            self.model, self.decoder, self.adapters = model, decoder, versions
        return version

    def _route_decode_matmuls(self, model: Any) -> None:
        """DECODE_MATMUL: few-row float32 matmuls on oneDNN on CPUs (consumer/engine/onednn.py)."""
        mode = self.settings.decode_matmul
        if mode == "default":
            return
        unusable = self._onednn_unusable(model)
        if unusable:
            if mode == "onednn":
                raise EngineLoadError(unusable)
            return  # auto: PyTorch's own kernels
        converted = onednn.route_few_rows_to_onednn(model)
        logger.info(
            "DECODE_MATMUL=%s: %d linear layers run calls of up to %d rows on oneDNN",
            mode,
            converted,
            onednn.ROWS_LIMIT,
        )

    def _onednn_unusable(self, model: Any) -> str | None:
        """Why DECODE_MATMUL=onednn cannot apply to `model`, or None where it can."""
        if self.settings.torch_compile:
            # torch.compile's CPU backend cannot lower these calls (it wants the weight as a graph
            # constant) and picks its own kernels, oneDNN included.
            return (
                "DECODE_MATMUL=onednn cannot be combined with TORCH_COMPILE: torch.compile picks its own CPU "
                "kernels; leave DECODE_MATMUL=auto"
            )
        if model.device.type != "cpu" or model.dtype != torch.float32 or not onednn.available():
            return (
                f"DECODE_MATMUL=onednn needs a float32 model on a CPU with a oneDNN-enabled PyTorch; this one is "
                f"{dtype_name(model.dtype)} on {model.device.type} (oneDNN available: {onednn.available()})"
            )
        return None

    def _flavour(self, device: str) -> CpuFlavour | None:
        return cpu_flavour() if device == "cpu" else None

    def _invariant_decoder(self, model: Any) -> InvariantDecoder | None:
        """BATCH_INVARIANT: the decoder, its row blocks resolved for this device, dtype and CPU."""
        if not self.settings.batch_invariant:
            return None
        device = model.device.type
        # oneDNN unless DECODE_MATMUL=default; TORCH_COMPILE leaves the decode alone (it compiles prefill only).
        onednn_usable = device == "cpu" and self.settings.decode_matmul != "default" and onednn.available()
        blocks = decode_row_blocks(
            device, model.dtype, self._flavour(device), onednn=onednn_usable, rows=self.settings.decode_rows
        )
        logger.info("BATCH_INVARIANT: every decode-step matmul runs on %s", blocks.describe())
        return InvariantDecoder(model, blocks)

    def _quantization_kwargs(self, device: str) -> dict[str, Any]:
        mode = self.settings.quantization
        if not mode:
            return {}
        if device != "cuda":
            raise EngineLoadError(f"QUANTIZATION={mode} needs bitsandbytes on a CUDA device; this one is {device}")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise EngineLoadError(
                f"QUANTIZATION={mode} needs the bitsandbytes package (pip install bitsandbytes)"
            ) from exc
        from transformers import BitsAndBytesConfig

        if mode == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
        return {"quantization_config": config, "device_map": {"": 0}}

    def _merge_adapter(self, model: Any, adapter_path: Path) -> Any:
        from peft import PeftModel

        logger.info("applying LoRA adapter from %s", adapter_path)
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_path))
        except Exception as exc:
            raise EngineLoadError(f"cannot load LoRA adapter at {adapter_path}: {exc}") from exc
        check_adapter_keys(peft_model, adapter_path)
        if self.settings.quantization:
            return peft_model  # merging into quantized weights loses precision; keep LoRA unmerged
        return peft_model.merge_and_unload()

    def _load_processor(self, adapter_path: Path, token: str | None) -> Any:
        from transformers import AutoProcessor, AutoTokenizer

        def has(names: tuple[str, ...]) -> bool:
            return any((adapter_path / name).is_file() for name in names)

        try:
            if has(PROCESSOR_FILES):
                logger.info("processor loaded from the adapter directory %s", adapter_path)
                processor = AutoProcessor.from_pretrained(str(adapter_path))
            else:
                processor = AutoProcessor.from_pretrained(self.settings.base_model_id, token=token)
                if has(TOKENIZER_FILES):
                    logger.info("tokenizer loaded from the adapter directory %s", adapter_path)
                    processor.tokenizer = AutoTokenizer.from_pretrained(str(adapter_path))
            if (adapter_path / "chat_template.jinja").is_file():
                logger.info("chat template taken from the adapter directory %s", adapter_path)
                processor.chat_template = (adapter_path / "chat_template.jinja").read_text()
        except Exception as exc:
            raise EngineLoadError(f"cannot load the processor: {exc}") from exc
        return self.configure_processor(processor)

    def configure_processor(self, processor: Any) -> Any:
        """Left padding (right padding breaks batched generation) and the IMAGE_MIN/MAX_PIXELS bounds."""
        processor.tokenizer.padding_side = "left"
        processor.image_processor.size = {
            "shortest_edge": self.settings.image_min_pixels,
            "longest_edge": self.settings.image_max_pixels,
        }
        return processor

    # -- run --------------------------------------------------------------------------------
    def warm_up(self) -> float:
        started = time.perf_counter()
        image = Image.new("RGB", (256, 192), "white")
        self.generate([GenerationRequest(image=image, prompt="Warm-up.")], max_new_tokens=2)
        if self.decoder is not None:
            with self._model_lock, self._activated(DEFAULT_ADAPTER):
                self._check_batch_invariance(self.decoder)
        seconds = round(time.perf_counter() - started, 3)
        logger.info("warm-up generation done in %.2f s", seconds)
        return seconds

    @torch.inference_mode()
    def _check_batch_invariance(self, decoder: InvariantDecoder, steps: int = 3) -> None:
        """Refuse to serve where this machine's kernels break BATCH_INVARIANT's promise.

        Three small images decoded together for a few steps must give the first image's logits bit for bit
        as decoding it alone does. The promise rests on measured kernel behaviour (consumer/engine/invariant.py
        RowBlocks); a CPU or library that computes differently fails here, at start, rather than in results.
        """
        images = [
            Image.new("RGB", (256, 192), "white"),
            Image.new("RGB", (192, 320), "black"),
            Image.new("RGB", (320, 256), (40, 90, 200)),
        ]
        prompts = [self._on_device(self.collate([GenerationRequest(image, "Warm-up.")])) for image in images]
        alone = decoder.trace(prompts[:1], steps)[0]
        together = decoder.trace(prompts, steps)[0]
        if not torch.equal(alone, together):
            raise EngineLoadError(
                f"BATCH_INVARIANT: on this machine a row's logits change with its batch (decode rows: "
                f"{decoder.blocks.describe()}; largest difference "
                f"{(alone - together).abs().max().item():.3g}); set DECODE_ROWS to a row count whose kernel "
                "sums the same way for every batch (python -m bench.cpu_kernels measures it), or BATCH_INVARIANT=false "
                "to give up the guarantee"
            )
        logger.info("BATCH_INVARIANT: checked (one image alone and in a batch of 3: identical logits)")

    def prompt_text(self, prompt: str) -> str:
        """The exact text the model sees for one image (chat template applied)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text: str = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    def prepare_image(self, image: Image.Image) -> ImageFeatures:
        """Resize, normalise and patchify one image (thread-safe); raises what the processor raises for an
        image it refuses (an aspect ratio over 200, say): that event is dead-lettered at `prepare`."""
        return self.image_features(image)

    def image_features(self, image: Image.Image) -> ImageFeatures:
        processed = self.processor.image_processor(images=[image], return_tensors="pt")
        return ImageFeatures(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])

    def collate(self, requests: Sequence[GenerationRequest]) -> dict[str, torch.Tensor]:
        """The model inputs for a batch: what `processor(text, images, padding=True)` returns.

        Images already prepared (`request.prepared`) are not processed again.
        """
        processor = self.processor
        image_token = processor.image_token
        tokens_per_patch = processor.image_processor.merge_size**2
        features, texts = [], []
        for request in requests:
            if request.prepared is not None:
                image_features = request.prepared
            elif request.image is not None:
                image_features = self.image_features(request.image)
            else:
                raise ValueError("a request needs its image or its prepared features")
            text = self.prompt_text(request.prompt)
            if text.count(image_token) != 1:
                raise ValueError(f"the prompt must not contain {image_token!r} itself")
            visual_tokens = int(image_features.image_grid_thw.prod()) // tokens_per_patch
            texts.append(text.replace(image_token, image_token * visual_tokens))
            features.append(image_features)
        encoded = processor.tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "mm_token_type_ids": torch.tensor(processor.create_mm_token_type_ids(encoded["input_ids"])),
            "pixel_values": torch.cat([f.pixel_values for f in features]),
            "image_grid_thw": torch.cat([f.image_grid_thw for f in features]),
        }

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest], max_new_tokens: int | None = None) -> GenerationBatch:
        """Describe every image; a batch that mixes adapters runs as one model call per adapter, in order of
        first appearance (an image's text does not depend on its batch, so it is the same either way)."""
        started = time.perf_counter()
        if not requests:
            return GenerationBatch([], 0.0)
        max_new_tokens = max_new_tokens or self.settings.max_new_tokens
        unknown = {request.adapter for request in requests} - set(self.adapters)
        if unknown:
            raise ValueError(f"unknown adapter {sorted(unknown)}; this engine has {sorted(self.adapters)}")
        generations: dict[int, Generation] = {}
        preprocess_seconds = 0.0
        with self._model_lock:
            for name in dict.fromkeys(request.adapter for request in requests):
                indices = [index for index, request in enumerate(requests) if request.adapter == name]
                with self._activated(name) as version:
                    rows, preprocess = self._generate_rows([requests[index] for index in indices], max_new_tokens)
                preprocess_seconds += preprocess
                for index, row in zip(indices, rows, strict=True):
                    generations[index] = self._generation(row, version)
        ordered = [generations[index] for index in range(len(requests))]
        return GenerationBatch(ordered, time.perf_counter() - started, preprocess_seconds)

    @contextmanager
    def _activated(self, name: str) -> Iterator[AdapterVersion]:
        """Model calls in the block run on adapter `name` (under the model lock)."""
        if self.adapter_set is None:
            yield self.adapters[name]
            return
        with self.adapter_set.activated(name) as version:
            yield version

    def _generate_rows(
        self, requests: Sequence[GenerationRequest], max_new_tokens: int
    ) -> tuple[list[list[int]], float]:
        """Each request's new tokens, and the seconds spent turning images and prompts into tensors."""
        started = time.perf_counter()
        if self.decoder is not None:
            # One unpadded sequence per image: nothing of one row's inputs depends on another's.
            prompts = [self._on_device(self.collate([request])) for request in requests]
            preprocess_seconds = time.perf_counter() - started
            rows = self.decoder.generate(prompts, max_new_tokens, self._eos_ids(), self._repetition_penalty())
        else:
            inputs = self._on_device(self.collate(requests))
            preprocess_seconds = time.perf_counter() - started
            rows = self._generate_padded(inputs, max_new_tokens)
        return rows, preprocess_seconds

    def _generation(self, row: list[int], adapter: AdapterVersion) -> Generation:
        tokenizer = self.processor.tokenizer
        special = {tokenizer.pad_token_id, *self._eos_ids()}
        produced = 0
        for token_id in row:
            produced += 1
            if token_id in special:
                break
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        return Generation(text=text, output_tokens=produced, adapter=adapter)

    def _on_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self.model.device) for name, tensor in inputs.items()}

    def _generate_padded(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> list[list[int]]:
        """BATCH_INVARIANT=false: the left-padded batch through transformers' generate; new tokens per row."""
        output = self.model.generate(
            **inputs,
            **self._cache_kwargs(inputs["input_ids"].shape[1] + max_new_tokens),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            # transformers compiles the decode step by itself on CUDA with a static cache; a service
            # whose batch shapes vary would recompile constantly, so only TORCH_COMPILE opts in.
            disable_compile=not self.settings.torch_compile,
        )
        rows: list[list[int]] = output[:, inputs["input_ids"].shape[1] :].tolist()
        return rows

    def kv_cache_implementation(self) -> str:
        """KV_CACHE resolved for the device the model runs on ("static" or "dynamic")."""
        if self.settings.kv_cache != "auto":
            return self.settings.kv_cache
        return "static" if self.model.device.type == "cpu" else "dynamic"

    def _cache_kwargs(self, max_length: int) -> dict[str, Any]:
        """generate's cache arguments: a FilledStaticCache (consumer/engine/kv_cache.py) or the dynamic default.

        With TORCH_COMPILE a static cache is transformers' own: fixed shapes are what a compiled graph
        wants, and attention over a prefix that grows every step would recompile it.
        """
        if self.kv_cache_implementation() == "dynamic":
            return {"cache_implementation": "dynamic"}
        if self.settings.torch_compile:
            return {"cache_implementation": "static"}
        text_config = self.model.config.get_text_config(decoder=True)
        return {"cache": FilledStaticCache(config=text_config, max_cache_len=max_length)}

    def _repetition_penalty(self) -> float:
        penalty = getattr(self.model.generation_config, "repetition_penalty", None)
        return 1.0 if penalty is None else float(penalty)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            return {self.processor.tokenizer.eos_token_id}
        return set(eos) if isinstance(eos, list) else {eos}
