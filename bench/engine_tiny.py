"""The engine's per-call overhead on the tiny model: the old way against this engine, batch 1..16.

    python -m bench.engine_tiny            # about 2 minutes on 2 busy cores
    python -m bench.engine_tiny --quick    # a smoke run

The tiny random-weight Qwen3-VL (devtools.tiny) does almost no arithmetic, so what is left is
what each `generate` call costs around the model: preprocessing, Python, kernel launches, per-token
overheads. Same 16 diagrams (three sizes) and the same number of new tokens per image (EOS ignored:
min_new_tokens = max_new_tokens), so every configuration does the same work:

- old way: the old service's recipe: float16, LoRA left unmerged (PeftModel without merge), the
  processor called per image, one image per `generate`;
- engine: QwenVLEngine as the service loads it (TORCH_DTYPE=auto, adapter merged), BATCH_SIZE images
  per `generate`, images preprocessed inside the call;
- engine, prepared ahead: the same, with each image's preprocessing done before the call, as the
  pipeline's fetch threads do (`prepare_image`), so the call only collates and runs the model;
- engine without its CPU defaults (KV_CACHE=dynamic, DECODE_MATMUL=default) at the smallest and
  largest batch: those defaults were chosen on the 2B model, and their fixed cost per call shows here.

Best of `--repeats` passes over the images (engine passes repeat for at least 3 s; old-way passes
run once before and once after each batch size, so both ways see the machine's load over time):
the minimum filters out bursts of load from other processes on a shared machine, where passes vary
a lot. Prints a table; writes
bench/results/engine-tiny.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.engine_common import format_table, machine_description, write_json
from consumer.engine.base import GenerationRequest
from consumer.engine.qwen import QwenVLEngine
from consumer.settings import Settings
from devtools.samples import sample_diagram
from devtools.tiny import make_tiny_model

SIZES = [(640, 480), (480, 352), (320, 240)]


def old_way(model_dir: Path, prompt: str, images, new_tokens: int):
    """A pass over all images the old service's way (float16, unmerged LoRA, one image per generate).

    Returns a function that runs one pass and returns its seconds (the model stays loaded).
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float16)
    model = PeftModel.from_pretrained(model, str(model_dir / "adapter")).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def describe(image) -> None:
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def run_pass() -> float:
        started = time.perf_counter()
        for image in images:
            describe(image)
        return time.perf_counter() - started

    describe(images[0])  # warm-up
    return run_pass


def best_of(run, repeats: int, min_seconds: float) -> float:
    """The fastest of at least `repeats` runs, going on until `min_seconds` have been spent."""
    times, spent = [], 0.0
    while len(times) < repeats or spent < min_seconds:
        times.append(run())
        spent += times[-1]
    return min(times)


def engine_pass(engine: QwenVLEngine, requests: list[GenerationRequest], batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(requests), batch):
        engine.generate(requests[start : start + batch])
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images, batches 1 and 4, one pass")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, help="an existing tiny model directory (default: build one)")
    args = parser.parse_args(argv)
    batches = [1, 4] if args.quick else [1, 2, 4, 8, 16]
    count = 8 if args.quick else args.images
    repeats = 1 if args.quick else args.repeats
    min_seconds = 0.0 if args.quick else 3.0

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or Path(scratch) / "tiny"
        if args.model is None:
            make_tiny_model(model_dir, seed=0)
        settings = Settings.from_environ(
            {}, base_model_id=str(model_dir), adapter_path=model_dir / "adapter", max_new_tokens=args.new_tokens
        )
        images = [sample_diagram(index, SIZES[index % len(SIZES)]) for index in range(count)]

        old_pass = old_way(model_dir, settings.prompt, images, args.new_tokens)
        old_times = [old_pass()]

        engine = QwenVLEngine(settings)
        engine_dtype = engine.load().dtype
        engine.model.generation_config.min_new_tokens = args.new_tokens  # EOS ignored: equal work
        engine.warm_up()
        plain = [GenerationRequest(image=image, prompt=settings.prompt) for image in images]
        prepared = [GenerationRequest(image, settings.prompt, engine.prepare_image(image)) for image in images]
        results = {"old": {"dtype": "float16", "adapter": "unmerged", "batch": 1}, "engine": []}
        for batch in batches:
            engine_pass(engine, plain[:batch], batch)  # warm this batch shape
            seconds = best_of(lambda batch=batch: engine_pass(engine, plain, batch), repeats, min_seconds)
            ahead = best_of(lambda batch=batch: engine_pass(engine, prepared, batch), repeats, min_seconds)
            results["engine"].append({"batch": batch, "seconds": seconds, "seconds_prepared_ahead": ahead})
            old_times.append(old_pass())  # interleaved: the old way sees the same machine load over time
        # The engine's CPU defaults (static KV cache, oneDNN for few-row matmuls) were chosen on the 2B
        # model; here, where every matrix is tiny, what they cost per call shows.
        plain_engine = QwenVLEngine(settings.model_copy(update={"kv_cache": "dynamic", "decode_matmul": "default"}))
        plain_engine.load()
        plain_engine.model.generation_config.min_new_tokens = args.new_tokens
        plain_engine.warm_up()
        results["engine_without_cpu_defaults"] = []
        for batch in (batches[0], batches[-1]):
            engine_pass(plain_engine, plain[:batch], batch)
            seconds = best_of(lambda batch=batch: engine_pass(plain_engine, plain, batch), repeats, min_seconds)
            results["engine_without_cpu_defaults"].append(
                {"batch": batch, "seconds": seconds, "images_per_s": count / seconds}
            )
            old_times.append(old_pass())
        old_seconds = min(old_times)
        results["old"]["seconds"], results["old"]["pass_seconds"] = old_seconds, old_times

    old_rate = count / old_seconds
    rows = [["old way", "float16", "unmerged", 1, f"{old_rate:.2f}", "-", "1.0x", "-"]]
    for entry in results["engine"]:
        rate, ahead_rate = count / entry["seconds"], count / entry["seconds_prepared_ahead"]
        entry["images_per_s"], entry["images_per_s_prepared_ahead"] = rate, ahead_rate
        entry["speedup_vs_old"], entry["speedup_prepared_ahead_vs_old"] = rate / old_rate, ahead_rate / old_rate
        rows.append(
            [
                "engine",
                engine_dtype,
                "merged",
                entry["batch"],
                f"{rate:.2f}",
                f"{ahead_rate:.2f}",
                f"{rate / old_rate:.1f}x",
                f"{ahead_rate / old_rate:.1f}x",
            ]
        )
    for entry in results["engine_without_cpu_defaults"]:
        entry["speedup_vs_old"] = entry["images_per_s"] / old_rate
        rows.append(
            [
                "engine, KV_CACHE=dynamic, DECODE_MATMUL=default",
                engine_dtype,
                "merged",
                entry["batch"],
                f"{entry['images_per_s']:.2f}",
                "-",
                f"{entry['speedup_vs_old']:.1f}x",
                "-",
            ]
        )
    results["old"]["images_per_s"] = old_rate
    headers = ["way", "dtype", "LoRA", "batch", "images/s", "images/s, prepared ahead", "vs old", "vs old, prepared"]
    print(
        f"\ntiny Qwen3-VL, {count} images of sizes {SIZES}, {args.new_tokens} new tokens each (EOS ignored), "
        f"best of {repeats}+ passes"
    )
    print(format_table(headers, rows))
    path = write_json(
        "engine-tiny-quick.json" if args.quick else "engine-tiny.json",
        {
            "command": "python -m bench.engine_tiny" + (" --quick" if args.quick else ""),
            "machine": machine_description(),
            "images": count,
            "sizes": SIZES,
            "new_tokens": args.new_tokens,
            "repeats": repeats,
            "engine_dtype": engine_dtype,
            **results,
        },
    )
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
