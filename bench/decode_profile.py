"""Where a decode step's time goes on this CPU, by batch: what holds the BATCH_INVARIANT decoder back.

    python -m bench.decode_profile                    # all 28 text layers, batches 1, 16 and 32
    python -m bench.decode_profile --batches 16 --steps 4
    python -m bench.decode_profile --rows 32 --batches 1 16 32 64   # DECODE_ROWS=32

The Qwen3-VL-2B text model in full (every layer: a decode step streams all of its weights) with one
vision block (the prefill only makes the cache), random weights, TORCH_DTYPE=auto for this CPU. One
1024x768 diagram is prefilled and its sequence copied `batch` times, grown to the mean context of a
384-token description; the engine's own `InvariantDecoder.step` runs on them. Each batch gets its
step time and a torch.profiler split by kind (matmuls, attention, the rest), against the step's memory
bound: the weights streamed once per call of DECODE_ROWS rows plus every sequence's keys and values read
once, at the streaming-read rate this run measures (bench.engine_cpu's `memory_bandwidth`).
Writes bench/results/decode-profile-<flavour>[-rows<N>].json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch

from bench.engine_common import (
    DTYPE_BYTES,
    NEW_TOKENS,
    bench_processor,
    command_line,
    machine_description,
    random_model,
    reduced,
    write_json,
)
from bench.engine_cpu import copied_sequence, invariant_prefill, memory_bandwidth
from bench.prefill_profile import kind_of
from consumer.engine.base import GenerationRequest
from consumer.engine.device import cpu_flavour, dtype_name, resolve_dtype
from consumer.engine.qwen import QwenVLEngine
from consumer.settings import Settings
from devtools.samples import sample_diagram
from devtools.tiny import REAL_2B


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per batch (one more runs first)")
    parser.add_argument("--rows", type=int, default=None, help="DECODE_ROWS (default: this CPU's)")
    args = parser.parse_args(argv)

    arch = reduced(REAL_2B, 1, REAL_2B.num_hidden_layers)
    dtype = resolve_dtype("auto", "cpu")
    processor, token_ids = bench_processor()
    settings = Settings.from_environ({}, base_model_id="random-weights", decode_rows=args.rows)
    engine = QwenVLEngine.from_model(settings, random_model(arch, dtype, token_ids, lora="merged"), processor)
    decoder = engine.decoder
    assert decoder is not None, "the profile is of the BATCH_INVARIANT decoder"
    inputs = engine.collate([GenerationRequest(image=sample_diagram(0, (1024, 768)), prompt=settings.prompt)])
    _, sequence = invariant_prefill(decoder, inputs, NEW_TOKENS)
    extra = NEW_TOKENS // 2  # the mean context over a description
    context = sequence.length + extra

    text = engine.model.model.language_model
    weight_bytes = sum(p.numel() for p in text.layers.parameters()) * DTYPE_BYTES[dtype]
    weight_bytes += engine.model.lm_head.weight.numel() * DTYPE_BYTES[dtype]
    kv_bytes_per_sequence = sum(k[:, :, :context].numel() * k.element_size() * 2 for k in sequence.keys)
    rate = memory_bandwidth(2.0)

    flavour = cpu_flavour()
    rows = []
    print(f"{flavour}, {dtype_name(dtype)}, 28 text layers, context {context}; streaming reads {rate:.1f} GB/s")
    print(f"weights {weight_bytes / 1e9:.2f} GB a step; keys and values {kv_bytes_per_sequence / 1e6:.0f} MB each")
    print("| batch | step s (median) | memory bound s | x bound | matmul | attention | rest |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in args.batches:
            sequences = [copied_sequence(sequence, extra) for _ in range(batch)]
            tokens = torch.full((batch,), 100, dtype=torch.long)
            decoder.step(sequences, tokens)  # first-call allocations
            times = []
            for _ in range(args.steps):
                started = time.perf_counter()
                decoder.step(sequences, tokens)
                times.append(time.perf_counter() - started)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                decoder.step(sequences, tokens)
            by_kind: dict[str, float] = defaultdict(float)
            for event in profile.key_averages():
                by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e6
            total = sum(by_kind.values())
            shares = {kind: value / total for kind, value in by_kind.items()}
            calls = -(-batch // decoder.blocks.max_rows)  # each call of up to max_rows rows streams the weights
            bound = (calls * weight_bytes + batch * kv_bytes_per_sequence) / (rate * 1e9)
            step = statistics.median(times)
            rows.append(
                {
                    "batch": batch,
                    "step_seconds": times,
                    "median_step_seconds": step,
                    "memory_bound_seconds": bound,
                    "ratio_to_bound": step / bound,
                    "profiled_seconds_by_kind": dict(by_kind),
                    "shares": shares,
                }
            )
            print(
                f"| {batch} | {step:.3f} | {bound:.3f} | {step / bound:.1f} | {shares.get('matmul', 0):.0%} | "
                f"{shares.get('attention', 0):.0%} | {shares.get('elementwise and other', 0):.0%} |"
            )
            del sequences
    path = write_json(
        f"decode-profile-{flavour}{f'-rows{args.rows}' if args.rows else ''}.json",
        {
            "command": command_line("python -m bench.decode_profile", argv),
            "machine": machine_description(),
            "flavour": flavour,
            "dtype": dtype_name(dtype),
            "decode_row_blocks": decoder.blocks.describe(),
            "context": context,
            "memory_gb_s": rate,
            "weight_bytes_per_step": weight_bytes,
            "kv_bytes_per_sequence": kv_bytes_per_sequence,
            "load_average": os.getloadavg(),
            "batches": rows,
        },
    )
    print(f"load {os.getloadavg()}; written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
