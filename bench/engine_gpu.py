"""The engine on one GPU (written for an H200): images/s at batch 1..64 against the physical floor.

    python -m bench.engine_gpu            # on a CUDA machine: under 8 minutes on an H200
    python -m bench.engine_gpu --quick    # a tiny config on the CPU: checks the script runs
    python -m bench.engine_gpu --kv-cache static --batches 8,32   # KV_CACHE=static against the default

The FULL Qwen3-VL-2B architecture (devtools.tiny.REAL_2B, real vocabulary size) with random
weights in bfloat16, built on the GPU (no checkpoint, no hub), SDPA attention (flash-attention 2
when installed, as the engine chooses), driven through the service's own engine
(`QwenVLEngine.from_model` + `generate`). Each image is a 1024x768 diagram (768 visual tokens) and gets
exactly 384 new tokens (min_new_tokens = max_new_tokens = 384: EOS cannot end a row early). Images
are prepared ahead (`prepare_image`), as the pipeline's fetch threads do, so each timed call is
collate + generate. One timed call per batch size, after a warm-up at that size with 8 tokens.

The floor per batch size is a roofline of this work on the GPU (peak dense bfloat16 rate and memory
bandwidth below; H200 by default): prefill at the compute rate, then each of the 383 decode steps
at the slower of its arithmetic (B images) and its memory traffic (the weights once, plus every
image's KV cache at that step's context). At batch 1 that is the weights, about 0.29 s per image;
at large batch the KV cache, and compute alone would allow about 148 images/s.

Prints a table; writes engine-gpu.json (--quick: engine-gpu-quick.json) to $OUT if set, else to
bench/results/. Stops starting new batch sizes once --budget seconds have passed.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from bench.engine_common import (
    NEW_TOKENS,
    NO_ADAPTER,
    bench_processor,
    flops_per_image,
    format_table,
    kv_bytes_per_token,
    machine_description,
    random_model,
    text_layer_params,
    weight_bytes_per_step,
    write_json,
)
from consumer.engine.base import GenerationRequest
from consumer.engine.qwen import QwenVLEngine
from consumer.settings import Settings
from devtools.samples import sample_diagram
from devtools.tiny import REAL_2B, REAL_VOCAB_SIZE, TINY, Architecture

H200 = {"name": "H200 SXM", "bf16_tflops": 989.0, "hbm_tb_s": 4.8}
ISSUE_REFERENCE = {"batch1_s_per_image": 0.29, "kv_bound_images_per_s": 69.0, "compute_only_images_per_s": 148.0}


def floor_seconds(arch: Architecture, batch: int, visual: int, text: int, new_tokens: int, gpu: dict) -> float:
    """Roofline seconds for one batch of `batch` images (see the module docstring)."""
    peak, bandwidth = gpu["bf16_tflops"] * 1e12, gpu["hbm_tb_s"] * 1e12
    flops = flops_per_image(arch, visual, text, new_tokens)
    seconds = batch * flops["prefill"] / peak
    weights = weight_bytes_per_step(arch, torch.bfloat16)
    kv = kv_bytes_per_token(arch, torch.bfloat16)
    q = arch.num_attention_heads * arch.head_dim
    step_flops = arch.num_hidden_layers * 2 * text_layer_params(arch) + 2 * arch.hidden_size * REAL_VOCAB_SIZE
    for step in range(1, new_tokens):
        context = visual + text + step
        compute = batch * (step_flops + arch.num_hidden_layers * 4 * context * q) / peak
        memory = (weights + batch * kv * context) / bandwidth
        seconds += max(compute, memory)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config, small images, 8 tokens, on the CPU")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--budget", type=float, default=390.0, help="seconds after which no new batch size starts")
    parser.add_argument("--tflops", type=float, default=H200["bf16_tflops"], help="peak dense bf16 TFLOP/s")
    parser.add_argument("--tb-s", type=float, default=H200["hbm_tb_s"], help="memory bandwidth, TB/s")
    parser.add_argument(
        "--kv-cache",
        choices=["auto", "static", "dynamic"],
        default="auto",
        help="the engine's KV_CACHE (auto is dynamic on CUDA; static is unmeasured there)",
    )
    args = parser.parse_args(argv)
    wall = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("no CUDA device: this benchmark is for a GPU (use --quick to check it on a CPU)")
        return 2
    device = "cuda" if cuda else "cpu"
    arch = TINY if args.quick else REAL_2B
    image_size = (320, 240) if args.quick else (1024, 768)
    new_tokens = 8 if args.quick else NEW_TOKENS
    batches = [1, 2, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    dtype = torch.bfloat16
    gpu = {
        "name": H200["name"] if (args.tflops, args.tb_s) == (H200["bf16_tflops"], H200["hbm_tb_s"]) else "custom",
        "bf16_tflops": args.tflops,
        "hbm_tb_s": args.tb_s,
    }

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - wall:6.1f} s] {text}", flush=True)

    processor, token_ids = bench_processor()
    settings = Settings.from_environ(
        {},
        base_model_id="random-weights",
        adapter_path=NO_ADAPTER,
        device=device,
        torch_dtype="bfloat16",
        max_new_tokens=new_tokens,
        kv_cache=args.kv_cache,
    )
    model = random_model(
        arch,
        dtype,
        token_ids,
        lora="merged",
        device=device,
        attn_implementation=QwenVLEngine(settings)._attention_implementation(device),
    )
    engine = QwenVLEngine.from_model(settings, model, processor)
    model.generation_config.min_new_tokens = new_tokens  # exactly new_tokens per image: EOS cannot stop a row
    say(
        f"model built on {device}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
        f"{model.config._attn_implementation}; {machine_description()['cuda'] or 'cpu'}"
    )
    engine.warm_up()

    images = [sample_diagram(index, image_size) for index in range(max(batches))]
    requests = [GenerationRequest(image, settings.prompt, engine.prepare_image(image)) for image in images]
    probe = engine.collate(requests[:1])
    visual = int(probe["image_grid_thw"].prod()) // 4
    text = probe["input_ids"].shape[1] - visual
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    results = []
    for batch in batches:
        if time.perf_counter() - wall > args.budget:
            say(f"budget of {args.budget:.0f} s spent: batch {batch} and larger not run")
            break
        batch_requests = requests[:batch]
        engine.generate(batch_requests, max_new_tokens=8 if not args.quick else 2)  # warm this batch shape
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        started = time.perf_counter()
        generations = engine.generate(batch_requests, max_new_tokens=new_tokens).generations
        sync()
        seconds = time.perf_counter() - started
        produced = [g.output_tokens for g in generations]
        floor = floor_seconds(arch, batch, visual, text, new_tokens, gpu)
        entry = {
            "batch": batch,
            "seconds": seconds,
            "images_per_s": batch / seconds,
            "seconds_per_image": seconds / batch,
            "tokens_per_image": min(produced),
            "floor_seconds": floor,
            "floor_images_per_s": batch / floor,
            "ratio_to_floor": seconds / floor,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        }
        results.append(entry)
        say(
            f"batch {batch}: {seconds:.2f} s, {entry['images_per_s']:.2f} images/s "
            f"(floor {entry['floor_images_per_s']:.1f}), {min(produced)}-{max(produced)} tokens per image"
        )
        gc.collect()

    rows = [
        [
            r["batch"],
            f"{r['seconds']:.2f}",
            f"{r['images_per_s']:.2f}",
            f"{r['seconds_per_image']:.3f}",
            f"{r['floor_images_per_s']:.1f}",
            f"{r['ratio_to_floor']:.1f}x",
            f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-",
        ]
        for r in results
    ]
    headers = ["batch", "s/batch", "images/s", "s/image", "floor images/s", "x floor", "peak GB"]
    flops = flops_per_image(arch, visual, text, new_tokens)
    title = (
        f"Qwen3-VL {'(quick: tiny config, CPU)' if args.quick else '2B architecture'}, random weights, "
        f"bfloat16, {image_size[0]}x{image_size[1]} images ({visual} visual + {text} text tokens), "
        f"{new_tokens} new tokens per image, {engine.kv_cache_implementation()} KV cache, "
        f"{machine_description()['cuda'] or 'cpu'}"
    )
    print("\n" + title)
    print(format_table(headers, rows))
    print(
        f"- floor: roofline at {gpu['bf16_tflops']:.0f} TFLOP/s bf16 and {gpu['hbm_tb_s']} TB/s "
        f"({gpu['name']}); {(flops['prefill'] + flops['decode']) / 1e12:.2f} TFLOP per image; the issue's "
        f"figures: {ISSUE_REFERENCE['batch1_s_per_image']} s/image at batch 1, "
        f"~{ISSUE_REFERENCE['kv_bound_images_per_s']:.0f} images/s KV-bound, "
        f"~{ISSUE_REFERENCE['compute_only_images_per_s']:.0f} images/s compute-only"
    )
    if args.quick:
        print("- QUICK: tiny config on the CPU against H200 floors: checks the script, means nothing")
    best = max(results, key=lambda r: r["images_per_s"]) if results else None
    stem = "engine-gpu" + ("" if args.kv_cache == "auto" else f"-{args.kv_cache}") + ("-quick" if args.quick else "")
    path = write_json(
        f"{stem}.json",
        {
            "command": "python -m bench.engine_gpu"
            + (" --quick" if args.quick else "")
            + ("" if args.kv_cache == "auto" else f" --kv-cache {args.kv_cache}")
            + ("" if args.batches == parser.get_default("batches") else f" --batches {args.batches}"),
            "quick": args.quick,
            "machine": machine_description(),
            "title": title,
            "gpu_peaks": gpu,
            "issue_reference": ISSUE_REFERENCE,
            "image_size": image_size,
            "visual_tokens": visual,
            "text_tokens": text,
            "new_tokens": new_tokens,
            "attention": model.config._attn_implementation,
            "kv_cache": engine.kv_cache_implementation(),
            "results": results,
            "best": best,
            "bench_seconds": time.perf_counter() - wall,
        },
    )
    print(f"written to {path}; total {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
