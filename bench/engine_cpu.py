"""The real Qwen3-VL-2B architecture on this CPU: the old way against this engine, per image.

    python -m bench.engine_cpu --quick    # 4 text / 4 vision layers, 512x384 images: a few minutes
    python -m bench.engine_cpu            # the full 2.13 B architecture, 1024x768: see bench/README.md for the time
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python -m bench.engine_cpu   # as an AVX512-BF16 CPU (no AMX)

The model has the FULL Qwen3-VL-2B-Instruct architecture (devtools.tiny.REAL_2B, real
vocabulary size) with random weights built in memory: no checkpoint, no hub. Each image is a
1024x768 diagram = 3072 patches = 768 visual tokens, described with 384 new tokens. Inputs are built
by the service's own engine (`QwenVLEngine.collate`), so shapes are what production runs.

The CPU's flavour (consumer.engine.device.cpu_flavour: avx2, avx512-bf16 or amx, capped by
ONEDNN_MAX_CPU_ISA as oneDNN is) names the results: bench/results/engine-cpu-<flavour>.json (--out DIR
to write elsewhere) and a PNG beside it.

Compared, per image:
- old way: what the old service did: one image per generate, float16 (its default), a random
  rank-16 LoRA on every text-model linear layer left unmerged (PeftModel, no merge);
- engine: TORCH_DTYPE=auto for this CPU (resolve_dtype), the same LoRA merged at load, the engine's
  defaults: BATCH_INVARIANT (each image prefilled alone, decode steps through
  consumer/engine/invariant.py with its row blocks) at batch 1, 4, 8, 16 and 32;
- engine, BATCH_INVARIANT=false: the left-padded transformers generate with the CPU defaults
  (static KV cache, oneDNN for few-row float32 matmuls) at the same batches: what the guarantee costs;
- reference: bfloat16, merged, batch 1 (skipped where auto already is bfloat16), to show why auto
  picks what it picks on this CPU.

Generating 384 tokens per image takes minutes on a CPU, so time is measured in parts and added up.
The shortcuts, all printed with the results:
1. prefill (vision encoder + text prefill + first token) is timed on one image at batch 1. The engine
   prefills one image at a time anyway; for BATCH_INVARIANT=false a batch of B is taken as B times
   that (compute-bound): checked on the reduced model below (the printed "prefill batch-4 / batch-1
   per image" ratio).
2. a decode step at batch B is timed on B copies of the one prefilled sequence (the engine's own
   per-sequence caches; for BATCH_INVARIANT=false, one KV cache replicated B times) with single-token
   steps; each step is timed at the prefill's context length and at that length + 383 (the cache
   padded with copies of itself), and the mean of the two is the mean step over 384 tokens (a step's
   cost is linear in its context length). First step of each run dropped.
3. the old way (float16 is emulated on most CPUs, 10-100x slower) and the bfloat16 reference are timed
   on a reduced model (1 vision block, 1 deepstack merger, 1 text layer, everything else full size)
   with every block, merger and layer timed by hooks, then scaled per block to the full depth. The
   same scaling applied to the engine's dtype is compared with the engine's full-model measurement
   (the printed "extrapolation check" ratio), so its error is visible.
Seconds per image = prefill + 384 x (decode step at batch B) / B.

The compute floor: the model's multiply-adds per image (counted from the architecture: vision
encoder, mergers, text prefill with causal attention, 384 decode steps with growing attention,
lm_head once per token) divided by this machine's best measured matrix-multiply rate (float32 or
bfloat16, nn.Linear shapes of this model). Batch 1 has a floor of its own: the prefill's share of
the compute floor plus 384 decode steps that each read every weight once at the measured memory
bandwidth (a step cannot be faster than its weights stream in).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import time
from pathlib import Path

import torch

from bench.engine_common import (
    NEW_TOKENS,
    NO_ADAPTER,
    ModuleTimer,
    base_of,
    bench_processor,
    command_line,
    flops_per_image,
    format_table,
    machine_description,
    random_model,
    reduced,
    weight_bytes_per_step,
    write_json,
)
from consumer.engine.base import GenerationRequest
from consumer.engine.device import cpu_flavour, default_batch_size, dtype_name, resolve_dtype
from consumer.engine.invariant import DecodeSequence, InvariantDecoder
from consumer.engine.kv_cache import FilledStaticCache
from consumer.engine.qwen import QwenVLEngine
from consumer.settings import Settings
from devtools.samples import sample_diagram
from devtools.tiny import REAL_2B, Architecture


# -- the machine ------------------------------------------------------------------------------------
def matmul_rate(dtype: torch.dtype, seconds: float) -> float:
    """Best GFLOP/s of nn.Linear on this model's two big shapes (text MLP, vision MLP)."""
    best = 0.0
    for tokens, inner, outer in ((768, 2048, 6144), (3072, 1024, 4096)):
        x = torch.randn(tokens, inner).to(dtype)
        weight = torch.randn(outer, inner).to(dtype)
        torch.nn.functional.linear(x, weight)
        runs, started = 0, time.perf_counter()
        while True:
            torch.nn.functional.linear(x, weight)
            runs += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds / 2 and runs >= 2:
                break
        best = max(best, 2 * tokens * inner * outer * runs / elapsed / 1e9)
    return best


def memory_bandwidth(seconds: float) -> float:
    """GB/s of streaming reads (a sum over 512 MiB), the bound of a decode step at small batch."""
    data = torch.ones(128 * 1024 * 1024)
    data.sum()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 2:
        data.sum()
        runs += 1
    return data.numel() * 4 * runs / (time.perf_counter() - started) / 1e9


# -- timing -----------------------------------------------------------------------------------------
@torch.inference_mode()
def prefill(model, inputs: dict, timer: ModuleTimer | None = None):
    """One prefill forward (first token's logits only, as generate does); returns (seconds, cache)."""
    if timer:
        timer.reset()
    started = time.perf_counter()
    output = base_of(model)(**inputs, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - started, output.cache


def grown_cache(cache, batch: int, extra: int, static: bool = False, room: int = 0, config=None):
    """`cache` replicated `batch` times, padded by `extra` positions (copies of itself).

    static: returned as the engine's KV_CACHE=static cache (the CPU default, FilledStaticCache) with
    `room` free positions; else a DynamicCache, grown by concatenation at every step.
    """
    grown = copy.deepcopy(cache)
    for layer in grown.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            if extra:
                repeats = -(-(tensor.shape[-2] + extra) // tensor.shape[-2])
                tensor = torch.cat([tensor] * repeats, dim=-2)[..., : tensor.shape[-2] + extra, :]
            # A static cache copies these rows into its own buffers: a broadcast view avoids holding
            # the batch's cache twice (at batch 32 that is 9 GB).
            rows = tensor.expand(batch, *tensor.shape[1:]) if static else tensor.repeat_interleave(batch, dim=0)
            setattr(layer, name, rows)
    if not static:
        return grown
    length = grown.get_seq_length()
    preallocated = FilledStaticCache(config=config, max_cache_len=length + room)
    for index, layer in enumerate(grown.layers):
        preallocated.update(layer.keys, layer.values, index, {"cache_position": torch.arange(length)})
    return preallocated


@torch.inference_mode()
def decode_steps(
    model, cache, batch: int, extra: int, steps: int, timer: ModuleTimer | None = None, static: bool = False
) -> list[float]:
    """Seconds of `steps` single-token forward passes at batch `batch`, context = cache + extra.

    One more step runs first, untimed (and unseen by `timer`): it pays for first-call allocations.
    static: the KV cache is a preallocated StaticCache (the engine on a CPU), else a DynamicCache.
    """
    context = cache.get_seq_length() + extra
    # Sized as the engine sizes it: the prompt plus NEW_TOKENS (and the steps timed here), whatever `extra` is.
    room = NEW_TOKENS - extra + steps + 2
    grown = grown_cache(cache, batch, extra, static=static, room=room, config=base_of(model).config)
    token = torch.full((batch, 1), 100, dtype=torch.long)
    times = []
    for step in range(steps + 1):
        if timer and step == 1:
            timer.reset()
        mask = torch.ones(batch, context + step + 1, dtype=torch.long)
        # Text and M-RoPE positions of the new token (their values cost nothing; generate passes them too).
        positions = torch.full((4, batch, 1), context + step, dtype=torch.long)
        started = time.perf_counter()
        where = {"cache_position": torch.tensor([context + step])} if static else {}
        base_of(model)(
            input_ids=token,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=grown,
            use_cache=True,
            logits_to_keep=1,
            **where,
        )
        times.append(time.perf_counter() - started)
    del grown
    return times[1:]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def decode_mean_step(model, cache, batch: int, steps: int, static: bool = False) -> tuple[float, float, float]:
    """(mean step over NEW_TOKENS tokens, step at start, step at end) at batch `batch`."""
    start = median(decode_steps(model, cache, batch, 0, steps, static=static))
    end = median(decode_steps(model, cache, batch, NEW_TOKENS - 1, steps, static=static))
    return (start + end) / 2, start, end


@torch.inference_mode()
def reduced_run(
    arch: Architecture,
    small: Architecture,
    dtype,
    lora: str,
    token_ids,
    inputs,
    steps: int,
    batch_check: int | None = None,
    static: bool = False,
) -> dict:
    """Prefill and batch-1 decode on `small`, each scaled per block/layer to `arch` (shortcut 3)."""
    model = random_model(small, dtype, token_ids, lora=lora)
    timer = ModuleTimer(model)
    prefill(model, inputs)  # warm-up: first-call allocations and kernel selection
    runs = []
    for _ in range(2):  # the faster of two: bursts of load from other processes only ever slow a run
        seconds, cache = prefill(model, inputs, timer)
        runs.append((seconds, timer.extrapolate(seconds, arch)))
    seconds, scaled = min(runs)
    result = {"prefill_measured": seconds, "prefill": scaled}
    steps_scaled = []
    for extra in (0, NEW_TOKENS - 1):
        times = decode_steps(model, cache, 1, extra, steps, timer, static=static)
        steps_scaled.append(timer.extrapolate(sum(times), arch, calls=len(times)))
    result["decode_step_1"] = sum(steps_scaled) / 2
    if batch_check:
        batched = {
            name: torch.cat([tensor] * batch_check)
            for name, tensor in inputs.items()
            if name not in ("pixel_values", "image_grid_thw")
        }
        batched["pixel_values"] = torch.cat([inputs["pixel_values"]] * batch_check)
        batched["image_grid_thw"] = torch.cat([inputs["image_grid_thw"]] * batch_check)
        timer.remove()
        batch_seconds, _ = prefill(model, batched)
        result["prefill_batch_ratio"] = batch_seconds / batch_check / seconds
    timer.remove()
    del model, cache
    gc.collect()
    return result


@torch.inference_mode()
def invariant_prefill(decoder: InvariantDecoder, inputs: dict, room: int):
    """The engine's own prefill of one image (BATCH_INVARIANT); (seconds, its DecodeSequence)."""
    started = time.perf_counter()
    sequence, _ = decoder.prefill(inputs, inputs["input_ids"].shape[1] + room)
    return time.perf_counter() - started, sequence


def copied_sequence(sequence: DecodeSequence, extra: int) -> DecodeSequence:
    """A copy of `sequence` with `extra` more positions filled (copies of its own keys and values)."""
    length = sequence.length

    def grown(buffer: torch.Tensor) -> torch.Tensor:
        copy_ = buffer.clone()
        for start in range(length, length + extra, length):
            end = min(start + length, length + extra)
            copy_[:, :, start:end] = buffer[:, :, : end - start]
        return copy_

    return DecodeSequence(
        keys=[grown(k) for k in sequence.keys],
        values=[grown(v) for v in sequence.values],
        length=length + extra,
        position_delta=sequence.position_delta,
        prompt_ids=sequence.prompt_ids,
    )


@torch.inference_mode()
def invariant_steps(decoder: InvariantDecoder, sequence: DecodeSequence, batch: int, extra: int, steps: int):
    """Seconds of `steps` decode steps of the engine's decoder over `batch` copies of `sequence`.

    One more step runs first, untimed: it pays for first-call allocations.
    """
    sequences = [copied_sequence(sequence, extra) for _ in range(batch)]
    tokens = torch.full((batch,), 100, dtype=torch.long)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        decoder.step(sequences, tokens)
        times.append(time.perf_counter() - started)
    del sequences
    gc.collect()
    return times[1:]


def invariant_mean_step(decoder: InvariantDecoder, sequence: DecodeSequence, batch: int, steps: int):
    """(mean step over NEW_TOKENS tokens, step at start, step at end) of the engine's decoder at `batch`."""
    start = median(invariant_steps(decoder, sequence, batch, 0, steps))
    end = median(invariant_steps(decoder, sequence, batch, NEW_TOKENS - 1, steps))
    return (start + end) / 2, start, end


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 text / 4 vision layers, 512x384 images")
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--steps", type=int, default=3, help="decode steps timed per point (after one dropped)")
    parser.add_argument("--skip-bf16", action="store_true", help="leave out the bfloat16 reference row")
    parser.add_argument(
        "--skip-padded", action="store_true", help="leave out the BATCH_INVARIANT=false rows (what the guarantee costs)"
    )
    parser.add_argument("--decode-rows", type=int, default=None, help="DECODE_ROWS for the engine (default: its own)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the results (default: bench/results)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # random weights must not hit slow denormal arithmetic
    arch = reduced(REAL_2B, vision_depth=4, text_layers=4) if args.quick else REAL_2B
    image_size = (512, 384) if args.quick else (1024, 768)
    batches = [int(b) for b in args.batches.split(",")]
    flavour = cpu_flavour()
    notes: list[str] = []
    wall = time.perf_counter()
    loads = {"start": load_average()}

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - wall:6.0f} s] {text}", flush=True)

    say(f"CPU flavour {flavour}; load average {loads['start']}")
    # 1. the machine
    rate_seconds = 1.0 if args.quick else 3.0
    rates = {
        name: matmul_rate(dtype, rate_seconds)
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16))
    }
    bandwidth = memory_bandwidth(rate_seconds)
    say(f"matmul GFLOP/s {', '.join(f'{k} {v:.0f}' for k, v in rates.items())}; memory {bandwidth:.1f} GB/s")

    # 2. inputs, built by the service's engine from a real diagram
    processor, token_ids = bench_processor()
    engine_dtype = resolve_dtype("auto", "cpu")
    settings = Settings.from_environ(
        {},
        base_model_id="random-weights",
        adapter_path=NO_ADAPTER,
        max_new_tokens=NEW_TOKENS,
        decode_rows=args.decode_rows,
    )
    image = sample_diagram(0, image_size)
    shaper = QwenVLEngine(settings)
    shaper.configure_processor(processor)
    shaper.processor = processor
    inputs = shaper.collate([GenerationRequest(image=image, prompt=settings.prompt)])
    visual_tokens = int(inputs["image_grid_thw"].prod()) // 4
    text_tokens = inputs["input_ids"].shape[1] - visual_tokens
    flops = flops_per_image(arch, visual_tokens, text_tokens, NEW_TOKENS)
    say(
        f"{image_size[0]}x{image_size[1]} image: {visual_tokens} visual + {text_tokens} text tokens; "
        f"{flops['prefill'] / 1e12:.2f} TFLOP prefill + {flops['decode'] / 1e12:.2f} TFLOP for {NEW_TOKENS} tokens"
    )

    # 3. this engine, full model, auto dtype, merged adapter
    say(f"building the {'quick' if args.quick else 'full'} model in {dtype_name(engine_dtype)} with a merged LoRA")
    model = random_model(arch, engine_dtype, token_ids, lora="merged")
    engine = QwenVLEngine.from_model(settings, model, processor)
    engine.warm_up()  # the service's own warm-up, and its check of the batch-invariance guarantee
    decoder = engine.decoder
    assert decoder is not None
    row_blocks = decoder.blocks.describe()
    say(f"engine: BATCH_INVARIANT, decode matmuls on {row_blocks}")
    room = NEW_TOKENS + args.steps + 2
    engine_prefill, sequence = min(invariant_prefill(decoder, inputs, room) for _ in range(2))
    say(f"engine prefill {engine_prefill:.1f} s (the faster of two)")
    engine_steps = {}
    for batch in batches:
        engine_steps[batch] = invariant_mean_step(decoder, sequence, batch, args.steps)
        say(
            f"engine decode step at batch {batch}: {engine_steps[batch][1]:.3f} s (start) / "
            f"{engine_steps[batch][2]:.3f} s (end of {NEW_TOKENS})"
        )
    del sequence
    gc.collect()
    padded_steps = {}
    if not args.skip_padded:
        padded = QwenVLEngine.from_model(settings.model_copy(update={"batch_invariant": False}), model, processor)
        static = padded.kv_cache_implementation() == "static"
        _, cache = prefill(model, inputs)
        for batch in batches:
            padded_steps[batch] = decode_mean_step(model, cache, batch, args.steps, static=static)
            say(
                f"BATCH_INVARIANT=false decode step at batch {batch}: {padded_steps[batch][1]:.3f} s (start) / "
                f"{padded_steps[batch][2]:.3f} s (end)"
            )
        del cache, padded
    del model, engine, decoder
    gc.collect()
    loads["engine_done"] = load_average()

    # 4. reduced models: the extrapolation check, the old way, the bfloat16 reference
    small = reduced(arch, vision_depth=1, text_layers=1)
    # The check validates the per-block scaling used for the old way, so it decodes the way the old way
    # does (dynamic cache); the engine's own rows are measured on the full model, nothing scaled.
    check = reduced_run(arch, small, engine_dtype, "merged", token_ids, inputs, args.steps, batch_check=4)
    say(
        f"extrapolation check ({dtype_name(engine_dtype)}): prefill {check['prefill']:.1f} s scaled vs "
        f"{engine_prefill:.1f} s measured; prefill batch-4 / batch-1 per image {check['prefill_batch_ratio']:.2f}"
    )
    old = reduced_run(arch, small, torch.float16, "unmerged", token_ids, inputs, args.steps)
    say(
        f"old way (float16, unmerged, scaled): prefill {old['prefill']:.1f} s, decode step {old['decode_step_1']:.3f} s"
    )
    bf16 = None
    if engine_dtype != torch.bfloat16 and not args.skip_bf16:
        bf16 = reduced_run(arch, small, torch.bfloat16, "merged", token_ids, inputs, args.steps)
        say(f"bfloat16 reference (scaled): prefill {bf16['prefill']:.1f} s, decode step {bf16['decode_step_1']:.3f} s")
    loads["end"] = load_average()

    # 5. per image
    best_rate = max(rates["float32"], rates["bfloat16"])
    floor = (flops["prefill"] + flops["decode"]) / (best_rate * 1e9)
    weights_s = weight_bytes_per_step(arch, engine_dtype) / (bandwidth * 1e9)
    batch1_floor = flops["prefill"] / (best_rate * 1e9) + NEW_TOKENS * weights_s
    per_image = lambda prefill_s, step_s, batch: prefill_s + NEW_TOKENS * step_s / batch  # noqa: E731
    old_seconds = per_image(old["prefill"], old["decode_step_1"], 1)
    configs = [
        {
            "name": "old way",
            "dtype": "float16",
            "lora": "unmerged",
            "batch": 1,
            "prefill_s": old["prefill"],
            "decode_step_s": old["decode_step_1"],
            "how": "scaled from 1 block/layer",
        }
    ]
    if bf16:
        configs.append(
            {
                "name": "reference",
                "dtype": "bfloat16",
                "lora": "merged",
                "batch": 1,
                "prefill_s": bf16["prefill"],
                "decode_step_s": bf16["decode_step_1"],
                "how": "scaled from 1 block/layer",
            }
        )
    for name, steps in (("engine", engine_steps), ("engine, BATCH_INVARIANT=false", padded_steps)):
        for batch, (step, start, end) in steps.items():
            configs.append(
                {
                    "name": name,
                    "dtype": dtype_name(engine_dtype),
                    "lora": "merged",
                    "batch": batch,
                    "prefill_s": engine_prefill,
                    "decode_step_s": step,
                    "decode_step_start_s": start,
                    "decode_step_end_s": end,
                    "how": "full model",
                }
            )
    for config in configs:
        config["seconds_per_image"] = per_image(config["prefill_s"], config["decode_step_s"], config["batch"])
        config["speedup_vs_old"] = old_seconds / config["seconds_per_image"]
        config["ratio_to_floor"] = config["seconds_per_image"] / floor
    engine_rows = {c["batch"]: c for c in configs if c["name"] == "engine"}
    best = min(engine_rows.values(), key=lambda c: c["seconds_per_image"])
    default_batch = default_batch_size("cpu", flavour, engine_dtype)
    by_batch = [engine_rows[b]["seconds_per_image"] for b in sorted(engine_rows)]
    summary = {
        "flavour": flavour,
        "ratio_to_floor": best["ratio_to_floor"],
        "best_batch": best["batch"],
        "default_batch": default_batch,
        "default_ratio_to_floor": (
            engine_rows[default_batch]["ratio_to_floor"] if default_batch in engine_rows else None
        ),
        "batch1_ratio_to_own_floor": engine_rows[1]["seconds_per_image"] / batch1_floor if 1 in engine_rows else None,
        "speedup_vs_old": best["speedup_vs_old"],
        "no_batch_slower_than_a_smaller_one": all(
            later <= earlier for earlier, later in zip(by_batch, by_batch[1:], strict=False)
        ),
    }
    if padded_steps:
        summary["invariance_cost_per_batch"] = {
            batch: engine_rows[batch]["seconds_per_image"] / config["seconds_per_image"]
            for config in configs
            if config["name"] == "engine, BATCH_INVARIANT=false"
            for batch in [config["batch"]]
        }

    rows = [
        [
            c["name"],
            c["dtype"],
            c["lora"],
            c["batch"],
            f"{c['prefill_s']:.1f}",
            f"{NEW_TOKENS * c['decode_step_s'] / c['batch']:.1f}",
            f"{c['seconds_per_image']:.1f}",
            f"{c['speedup_vs_old']:.1f}x",
            f"{c['ratio_to_floor']:.2f}",
            c["how"],
        ]
        for c in configs
    ]
    headers = [
        "way",
        "dtype",
        "LoRA",
        "batch",
        "prefill s/img",
        f"decode s/img ({NEW_TOKENS} tok)",
        "s/image",
        "vs old",
        "x floor",
        "measured on",
    ]
    imitated = os.environ.get("ONEDNN_MAX_CPU_ISA")
    notes += [
        f"CPU flavour {flavour}"
        + (f", imitated with ONEDNN_MAX_CPU_ISA={imitated} on a CPU with more" if imitated else "")
        + f"; load average (1, 5, 15 min) {loads['start']} at the start, {loads['engine_done']} after the "
        f"engine's rows, {loads['end']} at the end",
        "prefill timed at batch 1: the engine prefills each image alone; BATCH_INVARIANT=false batches prefill, "
        f"taken as linear in batch (on the reduced model a batch of 4 costs {check['prefill_batch_ratio']:.2f}x "
        "batch 1 per image)",
        "decode steps: one prefilled sequence copied B times (the engine: its own per-sequence caches and decoder; "
        "BATCH_INVARIANT=false: a preallocated static cache; the old way, the bfloat16 reference and the scaling "
        "check: a dynamic one); mean of the steps at context "
        f"{visual_tokens + text_tokens} and {visual_tokens + text_tokens + NEW_TOKENS - 1}; EOS never consulted",
        f"old way and bfloat16: timed on 1 vision block + 1 deepstack merger + 1 text layer, scaled per block; "
        f"the same scaling in {dtype_name(engine_dtype)} gives prefill {check['prefill']:.1f} s vs "
        f"{engine_prefill:.1f} s measured on the full model ({check['prefill'] / engine_prefill:.2f}x)",
        f"compute floor: {(flops['prefill'] + flops['decode']) / 1e12:.2f} TFLOP per image at {best_rate:.0f} GFLOP/s "
        f"(best of float32 {rates['float32']:.0f}, bfloat16 {rates['bfloat16']:.0f}) = {floor:.1f} s/image",
        f"weights streamed per decode step in {dtype_name(engine_dtype)}: "
        f"{weight_bytes_per_step(arch, engine_dtype) / 1e9:.2f} GB = {weights_s:.3f} s at {bandwidth:.1f} GB/s; "
        f"batch 1's own floor: prefill {flops['prefill'] / (best_rate * 1e9):.1f} s + {NEW_TOKENS} x "
        f"{weights_s:.3f} s = {batch1_floor:.1f} s/image",
    ]
    if args.quick:
        notes.insert(0, "QUICK: 4 text / 4 vision layers and 512x384 images; NOT the 2B model's numbers")
    title = (
        f"Qwen3-VL {'(quick: 4+4 layers)' if args.quick else '2B architecture'}, random weights, "
        f"{image_size[0]}x{image_size[1]} images ({visual_tokens} visual tokens), {NEW_TOKENS} new tokens, "
        f"{machine_description()['cpu']} as {flavour} ({torch.get_num_threads()} threads)"
    )
    print("\n" + title)
    print(format_table(headers, rows))
    for note in notes:
        print(f"- {note}")
    print(
        f"best: engine batch {best['batch']}: {best['speedup_vs_old']:.1f}x the old way, "
        f"{best['ratio_to_floor']:.2f}x the compute floor; default batch {default_batch}: "
        f"{summary['default_ratio_to_floor']}x; batch 1: {summary['batch1_ratio_to_own_floor']}x its own floor; "
        f"total bench time {time.perf_counter() - wall:.0f} s"
    )

    stem = f"engine-cpu-{flavour}" + ("-quick" if args.quick else "")
    command = command_line("python -m bench.engine_cpu", argv)
    path = write_json(
        f"{stem}.json",
        {
            "command": command,
            "quick": args.quick,
            "machine": machine_description(),
            "load_average": loads,
            "title": title,
            "image_size": image_size,
            "visual_tokens": visual_tokens,
            "text_tokens": text_tokens,
            "new_tokens": NEW_TOKENS,
            "engine_dtype": dtype_name(engine_dtype),
            "decode_row_blocks": row_blocks,
            "matmul_gflops": rates,
            "memory_gb_s": bandwidth,
            "flops_per_image": flops,
            "floor_seconds_per_image": floor,
            "batch1_floor_seconds_per_image": batch1_floor,
            **summary,
            "configs": configs,
            "best": {"batch": best["batch"], "dtype": best["dtype"], "seconds_per_image": best["seconds_per_image"]},
            "extrapolation_check": {
                "prefill_scaled_s": check["prefill"],
                "prefill_measured_s": engine_prefill,
                "decode_step_scaled_s": check["decode_step_1"],
                "prefill_batch4_per_image_ratio": check["prefill_batch_ratio"],
            },
            "notes": notes,
            "bench_seconds": time.perf_counter() - wall,
        },
        directory=args.out,
    )
    plot(configs, floor, title, path.with_suffix(".png"))
    print(f"written to {path} and {path.with_suffix('.png').name}")
    return 0


def plot(configs: list[dict], floor: float, title: str, path) -> None:
    """Stacked horizontal bars per configuration: prefill + decode seconds per image, floor marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c['name']}, {c['dtype']}, LoRA {c['lora']}, batch {c['batch']}" for c in configs][::-1]
    prefill = [c["prefill_s"] for c in configs][::-1]
    decode = [c["seconds_per_image"] - c["prefill_s"] for c in configs][::-1]
    figure, axis = plt.subplots(figsize=(10, 1.8 + 0.55 * len(configs)))
    axis.barh(labels, prefill, label="prefill (vision + prompt)", color="#4c72b0")
    axis.barh(labels, decode, left=prefill, label=f"decode ({NEW_TOKENS} tokens)", color="#dd8452")
    axis.axvline(floor, color="black", linestyle="--", label=f"compute floor {floor:.1f} s")
    for row, config in enumerate(configs[::-1]):
        axis.text(
            config["seconds_per_image"],
            row,
            f"  {config['seconds_per_image']:.0f} s, {config['speedup_vs_old']:.1f}x old",
            va="center",
            fontsize=8,
        )
    axis.set_xlabel("seconds per image")
    axis.set_xlim(0, max(c["seconds_per_image"] for c in configs) * 1.3)
    axis.set_title(title, fontsize=8)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
