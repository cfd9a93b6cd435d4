"""Shared by the engine benchmarks: random-weight Qwen3-VL models, per-module timing, results files.

Not a test and not part of the service. Models here are built in memory with random weights (no
checkpoint files, no hub), in the real architecture from devtools.tiny, and run through the
service's own engine (QwenVLEngine.from_model) so inputs are built exactly as in production.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from devtools.tiny import (
    REAL_VOCAB_SIZE,
    Architecture,
    _train_tokenizer,
    make_processor,
    qwen3_vl_config,
    randomize_lora_b,
    special_token_ids,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NEW_TOKENS = 384  # the old service's MAX_NEW_TOKENS: what one description costs
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
NO_ADAPTER = Path("/nonexistent/no-adapter")
"""ADAPTER_PATH for engines over models built in memory (QwenVLEngine.from_model): their LoRA, if any, is
already in the model, and a mounted /app/models/weights must not be merged into random weights."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def results_dir() -> Path:
    """$OUT when the device runner sets it, else bench/results/."""
    directory = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_json(name: str, payload: dict, directory: Path | None = None) -> Path:
    """`payload` as `name` in `directory` (created if missing), else in results_dir()."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    path = (directory or results_dir()) / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def command_line(module: str, argv: list[str] | None) -> str:
    """How this run was started, with the variables that choose the CPU flavour it ran as."""
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    capped = " ".join(f"{name}={os.environ[name]}" for name in FLAVOUR_VARIABLES if name in os.environ)
    return " ".join(part for part in (capped, module, arguments) if part)


FLAVOUR_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def machine_description() -> dict:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    model = ""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16")),
        "avx512": "avx512f" in flags.split(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def bench_processor():
    """A Qwen3-VL processor (real patch 16 / merge 2 image processor) with the tiny byte-level tokenizer.

    The tokenizer's special-token ids are put into the model config, so a model with the real vocabulary
    size (151,936) and this tokenizer agree; only the prompt's text tokens differ from Qwen's tokenizer.
    """
    tokenizer = _train_tokenizer()
    token_ids = special_token_ids(tokenizer)
    return make_processor(tokenizer), token_ids


def reduced(arch: Architecture, vision_depth: int, text_layers: int) -> Architecture:
    """The same architecture with fewer vision blocks and text layers (one deepstack merger per block)."""
    deepstack = tuple(range(min(len(arch.deepstack_visual_indexes), vision_depth)))
    return dataclasses.replace(
        arch, vision_depth=vision_depth, num_hidden_layers=text_layers, deepstack_visual_indexes=deepstack
    )


def random_model(
    arch: Architecture,
    dtype: torch.dtype,
    token_ids: dict,
    lora: str | None,
    seed: int = 0,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
):
    """A Qwen3VLForConditionalGeneration with random weights in `dtype`, the real vocabulary size.

    lora: None (base model), "merged" (a random rank-16 LoRA merged into the weights, as the engine
    does at load) or "unmerged" (the LoRA left as separate modules, as the old service ran it).
    Built directly on `device` (initialising 2 B parameters on a GPU takes seconds, not minutes).
    """
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    config = qwen3_vl_config(arch, vocab_size=REAL_VOCAB_SIZE, token_ids=token_ids)
    config._attn_implementation = attn_implementation
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = token_ids["eos_token_id"]
    model.generation_config.pad_token_id = token_ids["pad_token_id"]
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0))
    randomize_lora_b(peft_model, 0.01)
    peft_model.eval()
    return peft_model.merge_and_unload() if lora == "merged" else peft_model


def base_of(model):
    """The Qwen3VLForConditionalGeneration inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# -- the work, counted from the architecture ---------------------------------------------------------
def text_layer_params(arch: Architecture) -> int:
    h, q = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    return h * q + 2 * h * kv + q * h + 3 * h * arch.intermediate_size


def flops_per_image(arch: Architecture, visual_tokens: int, text_tokens: int, new_tokens: int) -> dict[str, float]:
    """Floating-point operations (a multiply-add = 2) for one image, from the architecture."""
    patches = 4 * visual_tokens  # 2x2 patches merge into one visual token
    vh, vi = arch.vision_hidden_size, arch.vision_intermediate_size
    vision = 2 * patches * (3 * 2 * 16 * 16) * vh  # patch embedding
    vision += arch.vision_depth * (2 * patches * (3 * vh * vh + vh * vh + 2 * vh * vi) + 4 * patches**2 * vh)
    merged = 4 * vh
    vision += (
        (1 + len(arch.deepstack_visual_indexes)) * 2 * visual_tokens * (merged * merged + merged * arch.hidden_size)
    )
    q = arch.num_attention_heads * arch.head_dim
    layer = text_layer_params(arch)
    context = visual_tokens + text_tokens
    lm_head = 2 * arch.hidden_size * REAL_VOCAB_SIZE
    prefill_text = arch.num_hidden_layers * (2 * context * layer + 2 * context**2 * q) + lm_head
    decode = sum(
        arch.num_hidden_layers * (2 * layer + 4 * (context + step) * q) + lm_head for step in range(1, new_tokens)
    )
    return {"vision": vision, "prefill_text": prefill_text, "prefill": vision + prefill_text, "decode": decode}


def weight_bytes_per_step(arch: Architecture, dtype: torch.dtype) -> int:
    return (arch.num_hidden_layers * text_layer_params(arch) + arch.hidden_size * REAL_VOCAB_SIZE) * DTYPE_BYTES[dtype]


def kv_bytes_per_token(arch: Architecture, dtype: torch.dtype) -> int:
    """Keys and values one token leaves in the cache, all layers."""
    return arch.num_hidden_layers * 2 * arch.num_key_value_heads * arch.head_dim * DTYPE_BYTES[dtype]


class ModuleTimer:
    """Wall time spent inside each vision block, deepstack merger and text layer during one call.

    CPU kernels run synchronously, so the time between a module's pre- and post-hook is its cost. On
    CUDA the caller synchronises (hooks add syncs: use only where that is acceptable).
    """

    def __init__(self, model) -> None:
        inner = base_of(model).model
        self.groups = {
            "vision_block": list(inner.visual.blocks),
            "deepstack_merger": list(inner.visual.deepstack_merger_list),
            "text_layer": list(inner.language_model.layers),
        }
        self.seconds: dict[str, list[float]] = {name: [] for name in self.groups}
        self._handles = []
        self._started: dict[int, float] = {}
        sync = torch.cuda.synchronize if next(inner.parameters()).is_cuda else (lambda: None)
        for group, modules in self.groups.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._pre(sync)))
                self._handles.append(module.register_forward_hook(self._post(group, sync)))

    def _pre(self, sync: Callable[[], None]):
        def hook(module, args):
            sync()
            self._started[id(module)] = time.perf_counter()

        return hook

    def _post(self, group: str, sync: Callable[[], None]):
        def hook(module, args, output):
            sync()
            self.seconds[group].append(time.perf_counter() - self._started.pop(id(module)))

        return hook

    def reset(self) -> None:
        self.seconds = {name: [] for name in self.groups}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def extrapolate(self, total: float, target: Architecture, calls: int = 1) -> float:
        """Seconds per model call had the model `target`'s depth.

        `total` is the time of the `calls` model calls the hooks saw. What was spent outside the timed
        modules is kept; each block, merger and layer counts `target`'s number of times its mean.
        """
        counts = {
            "vision_block": target.vision_depth,
            "deepstack_merger": len(target.deepstack_visual_indexes),
            "text_layer": target.num_hidden_layers,
        }
        fixed = (total - sum(sum(values) for values in self.seconds.values())) / calls
        return fixed + sum(
            counts[group] * (sum(values) / len(values)) for group, values in self.seconds.items() if values
        )


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
