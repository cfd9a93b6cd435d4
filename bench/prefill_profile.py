"""Where a prefill's time goes on this CPU, by kind of kernel: what holds the engine's prefill back.

    python -m bench.prefill_profile                      # 4 vision blocks + 4 text layers, full width
    python -m bench.prefill_profile --vision 2 --text 2  # quicker

The Qwen3-VL-2B architecture with fewer blocks (every block is the same shapes, so the shares are the
full model's), random weights, TORCH_DTYPE=auto for this CPU, one 1024x768 diagram through the
engine's own BATCH_INVARIANT prefill (bench.engine_cpu times the same call on the full model).
torch.profiler's self time per operator is grouped into matmuls, attention, and elementwise work
(copies, casts, activations, normalisation, rotary embedding): the compute floor counts only the
first two, so the third is time the floor does not see. Writes bench/results/prefill-profile-<flavour>.json.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch

from bench.engine_common import (
    bench_processor,
    command_line,
    flops_per_image,
    machine_description,
    random_model,
    reduced,
    write_json,
)
from bench.engine_cpu import invariant_prefill
from consumer.engine.base import GenerationRequest
from consumer.engine.device import cpu_flavour, dtype_name, resolve_dtype
from consumer.engine.qwen import QwenVLEngine
from consumer.settings import Settings
from devtools.samples import sample_diagram
from devtools.tiny import REAL_2B

KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "mkldnn::_linear_pointwise"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
}


def kind_of(name: str) -> str:
    for kind, names in KINDS.items():
        if name in names or (kind == "attention" and "scaled_dot_product" in name):
            return kind
    return "elementwise and other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", type=int, default=4, help="vision blocks (the real model has 24)")
    parser.add_argument("--text", type=int, default=4, help="text layers (the real model has 28)")
    args = parser.parse_args(argv)

    arch = reduced(REAL_2B, args.vision, args.text)
    dtype = resolve_dtype("auto", "cpu")
    processor, token_ids = bench_processor()
    settings = Settings.from_environ({}, base_model_id="random-weights")
    engine = QwenVLEngine.from_model(settings, random_model(arch, dtype, token_ids, lora="merged"), processor)
    engine.warm_up()
    assert engine.decoder is not None, "the profile is of the BATCH_INVARIANT prefill"
    request = GenerationRequest(image=sample_diagram(0, (1024, 768)), prompt=settings.prompt)
    inputs = engine.collate([request])
    seconds = min(invariant_prefill(engine.decoder, inputs, 8)[0] for _ in range(2))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        started = time.perf_counter()
        invariant_prefill(engine.decoder, inputs, 8)
        profiled = time.perf_counter() - started
    by_kind: dict[str, float] = defaultdict(float)
    by_operator: dict[str, float] = defaultdict(float)
    for event in profile.key_averages():
        by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e6
        by_operator[event.key] += event.self_cpu_time_total / 1e6
    total = sum(by_kind.values())
    visual_tokens = int(inputs["image_grid_thw"].prod()) // 4
    flops = flops_per_image(arch, visual_tokens, inputs["input_ids"].shape[1] - visual_tokens, 0)["prefill"]
    rate = flops / (by_kind["matmul"] + by_kind["attention"]) / 1e9

    flavour = cpu_flavour()
    print(f"{flavour}, {dtype_name(dtype)}, {args.vision} vision blocks + {args.text} text layers, 1024x768")
    print(f"prefill {seconds:.2f} s (the faster of two unprofiled runs); profiled run {profiled:.2f} s")
    print(f"{flops / 1e12:.2f} TFLOP, at {rate:.0f} GFLOP/s within matmuls and attention; load {os.getloadavg()}")
    print("| kind | seconds | share |\n|---|---|---|")
    for kind, value in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"| {kind} | {value:.2f} | {value / total:.0%} |")
    top = sorted(by_operator.items(), key=lambda item: -item[1])[:12]
    print("| operator | seconds | share |\n|---|---|---|")
    for name, value in top:
        print(f"| {name} | {value:.2f} | {value / total:.0%} |")
    path = write_json(
        f"prefill-profile-{flavour}.json",
        {
            "command": command_line("python -m bench.prefill_profile", argv),
            "machine": machine_description(),
            "flavour": flavour,
            "dtype": dtype_name(dtype),
            "vision_blocks": args.vision,
            "text_layers": args.text,
            "prefill_seconds": seconds,
            "profiled_seconds": profiled,
            "prefill_flops": flops,
            "gflops_in_matmul_and_attention": rate,
            "load_average": os.getloadavg(),
            "by_kind_seconds": dict(by_kind),
            "top_operators_seconds": dict(top),
        },
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
