"""What ADAPTERS costs against the one merged adapter, and what reloading an adapter costs.

    python -m bench.adapters            # about 10 minutes on 2 busy cores
    python -m bench.adapters --quick    # a smoke run

Part 1, seconds per image. The Qwen3-VL-2B architecture at its real widths and vocabulary, reduced to
`--text-layers` text layers (28 in the real model) and one vision block, random weights, and two random
rank-16 LoRA adapters on every text linear layer (q/k/v/o and gate/up/down projections), as in
bench/engine_cpu.py. 512x384 diagrams prepared ahead (the pipeline's fetch threads do that), `--new-tokens`
new tokens per image (EOS made unreachable, so every configuration generates the same tokens count),
the service's engine (QwenVLEngine.from_model, BATCH_INVARIANT on) in this CPU's automatic dtype:

- merged: ADAPTER_PATH alone, merged into the weights at load (the mode without ADAPTERS);
- ADAPTERS, one adapter: both adapters loaded unmerged, every image on `default`;
- ADAPTERS, mixed: the same engine, images alternating between `default` and `b` within each batch (the
  engine runs one model call per adapter).

LoRA's added work is per targeted layer, so the difference is also given per text layer and scaled to the
real model's 28 (what the vision block, the embedding and the 151,936-row lm_head cost is the same in
every mode).

Part 2, reloading, on the tiny model (devtools.tiny): `reload_adapter`'s seconds and how far the process's
resident memory rose above where it was before the reload (sampled every 5 ms), for the merged default
adapter (the whole model built again from BASE_MODEL_ID while the old one is kept) and for an adapter of
ADAPTERS (its weights only).

Best of `--repeats` passes, the three modes' passes interleaved (other work on a shared machine then
falls on all of them alike). Prints tables; writes bench/results/adapters.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.engine_common import (
    LORA_TARGETS,
    bench_processor,
    command_line,
    format_table,
    machine_description,
    random_model,
    reduced,
    write_json,
)
from consumer.engine.base import GenerationRequest
from consumer.engine.device import dtype_name, resolve_dtype
from consumer.engine.qwen import QwenVLEngine
from consumer.settings import Settings
from devtools.samples import sample_diagram
from devtools.tiny import REAL_2B, SECOND_ADAPTER, make_tiny_model, randomize_lora_b

IMAGE_SIZE = (512, 384)
REAL_TEXT_LAYERS = REAL_2B.num_hidden_layers


def write_adapters(arch, token_ids: dict, directory: Path) -> tuple[Path, Path]:
    """Two random rank-16 LoRA adapters for `arch` (float32 files, as peft saves them): `a` and `b`."""
    from peft import LoraConfig, get_peft_model

    base = random_model(arch, torch.float32, token_ids, lora=None)
    peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0))
    paths = []
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        randomize_lora_b(peft_model, 0.01)
        peft_model.save_pretrained(directory / name)
        paths.append(directory / name)
    return paths[0], paths[1]


def engine_over(arch, dtype: torch.dtype, token_ids: dict, processor, settings: Settings) -> QwenVLEngine:
    engine = QwenVLEngine.from_model(settings, random_model(arch, dtype, token_ids, lora=None), processor)
    engine.model.generation_config.eos_token_id = -1  # no token ends a row: the same work in every mode
    engine.warm_up()
    return engine


def one_pass(engine: QwenVLEngine, requests: list[GenerationRequest], batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(requests), batch):
        engine.generate(requests[start : start + batch])
    return time.perf_counter() - started


def per_image(args: argparse.Namespace, scratch: Path) -> dict:
    """Seconds per image of each mode and batch: the best of `repeats` passes, the modes' passes
    interleaved, so that load from other processes on a shared machine falls on all of them alike."""
    arch = reduced(REAL_2B, vision_depth=1, text_layers=args.text_layers)
    processor, token_ids = bench_processor()
    dtype = resolve_dtype("auto", "cpu")
    default, second = write_adapters(arch, token_ids, scratch)
    common = {"base_model_id": "random-weights", "device": "cpu", "max_new_tokens": args.new_tokens}
    images = [sample_diagram(index, IMAGE_SIZE) for index in range(args.images)]
    merged = engine_over(arch, dtype, token_ids, processor, Settings.from_environ({}, adapter_path=default, **common))
    settings = Settings.from_environ({}, adapter_path=default, adapters=(("b", second),), **common)
    several = engine_over(arch, dtype, token_ids, processor, settings)
    prepared = [GenerationRequest(None, merged.settings.prompt, merged.prepare_image(image)) for image in images]
    mixed = [
        GenerationRequest(None, request.prompt, request.prepared, adapter="b" if index % 2 else "default")
        for index, request in enumerate(prepared)
    ]
    modes = {
        "merged": (merged, prepared),
        "ADAPTERS, one adapter per batch": (several, prepared),
        "ADAPTERS, mixed batches": (several, mixed),
    }
    passes: dict[str, dict[int, list[float]]] = {mode: {batch: [] for batch in args.batches} for mode in modes}
    for batch in args.batches:
        for engine, requests in modes.values():
            engine.generate(requests[:batch])  # this batch shape once, untimed
        for _ in range(args.repeats):
            for mode, (engine, requests) in modes.items():
                passes[mode][batch].append(one_pass(engine, requests, batch) / len(requests))
    rows = {mode: {batch: min(times) for batch, times in by_batch.items()} for mode, by_batch in passes.items()}
    return {"dtype": dtype_name(dtype), "text_layers": args.text_layers, "seconds_per_image": rows, "passes": passes}


class PeakRss:
    """The process's resident memory sampled every 5 ms on a thread: how far it rose above the start."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def rise_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def reloads(scratch: Path) -> dict:
    tiny = scratch / "tiny"
    make_tiny_model(tiny, seed=0)
    results = {}
    for mode in ("merged", "ADAPTERS"):
        served = scratch / f"served-{mode}"
        shutil.copytree(tiny / "adapter", served)
        if mode == "merged":
            settings = Settings.from_environ({}, base_model_id=str(tiny), adapter_path=served, device="cpu")
            name = "default"
        else:
            settings = Settings.from_environ(
                {}, base_model_id=str(tiny), adapter_path=tiny / "adapter", adapters=(("b", served),), device="cpu"
            )
            name = "b"
        engine = QwenVLEngine(settings)
        info = engine.load()
        engine.warm_up()
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        shutil.rmtree(served)
        shutil.copytree(tiny / SECOND_ADAPTER, served)
        with PeakRss() as memory:
            started = time.perf_counter()
            engine.reload_adapter(name)
            seconds = time.perf_counter() - started
        results[mode] = {
            "reload_seconds": seconds,
            "rss_rise_mib": memory.rise_mib,
            "model_load_seconds": info.model_load_time,
            "weights_mib": weights / 2**20,
            "dtype": info.dtype,
        }
        del engine
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 text layer, 4 images, batches 1 and 4, 4 tokens")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    args.batches = [1, 4, 8]
    if args.quick:
        args.text_layers, args.images, args.new_tokens, args.repeats, args.batches = 1, 4, 4, 1, [1, 4]

    with tempfile.TemporaryDirectory() as scratch:
        timing = per_image(args, Path(scratch))
        reload_costs = reloads(Path(scratch))

    rows = timing["seconds_per_image"]
    merged = rows["merged"]
    table = []
    for mode, seconds in rows.items():
        for batch, value in seconds.items():
            added = value - merged[batch]
            table.append(
                [
                    mode,
                    batch,
                    f"{value:.3f}",
                    f"{value / merged[batch]:.2f}x",
                    f"{added / args.text_layers * 1000:+.1f}",
                    f"{added / args.text_layers * REAL_TEXT_LAYERS:+.2f}",
                ]
            )
    print(
        f"\nQwen3-VL-2B widths, {args.text_layers} text layers and 1 vision block, random weights, two rank-16 "
        f"adapters, {timing['dtype']}, {args.images} images {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, "
        f"{args.new_tokens} new tokens each, best of {args.repeats}"
    )
    headers = ["mode", "batch", "s/image", "vs merged", "added ms/image per text layer", "added s/image at 28 layers"]
    print(format_table(headers, table))
    print("\nreloading an adapter, tiny model")
    reload_rows = [
        [
            mode,
            entry["dtype"],
            f"{entry['reload_seconds']:.2f}",
            f"{entry['model_load_seconds']:.2f}",
            f"{entry['rss_rise_mib']:.1f}",
            f"{entry['weights_mib']:.1f}",
        ]
        for mode, entry in reload_costs.items()
    ]
    print(format_table(["mode", "dtype", "reload s", "load s", "RSS rise MiB", "model MiB"], reload_rows))
    path = write_json(
        "adapters-quick.json" if args.quick else "adapters.json",
        {
            "command": command_line("python -m bench.adapters", argv),
            "machine": machine_description(),
            "image_size": IMAGE_SIZE,
            "images": args.images,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            **timing,
            "reload": reload_costs,
        },
    )
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
