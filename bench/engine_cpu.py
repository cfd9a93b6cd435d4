"""The real Qwen3-VL-2B architecture on this CPU: the old way against this engine, per image.

    python -m bench.engine_cpu --quick    # 4 text / 4 vision layers, 512x384 images: a few minutes
    python -m bench.engine_cpu            # the full 2.13 B architecture, 1024x768: see bench/README.md for the time

The model has the FULL Qwen3-VL-2B-Instruct architecture (devtools.tiny.REAL_2B, real
vocabulary size) with random weights built in memory: no checkpoint, no hub. Each image is a
1024x768 diagram = 3072 patches = 768 visual tokens, described with 384 new tokens. Inputs are built
by the service's own engine (`QwenVLEngine.collate`), so shapes are what production runs.

Compared, per image:
- old way: what the old service did: one image per generate, float16 (its default), a random
  rank-16 LoRA on every text-model linear layer left unmerged (PeftModel, no merge);
- engine: TORCH_DTYPE=auto for this CPU (resolve_dtype), the same LoRA merged at load, the
  engine's CPU defaults (static KV cache, oneDNN for few-row matmuls), batch 1, 4, 8, 16 and 32;
- reference: bfloat16, merged, batch 1 (skipped where auto already is bfloat16), to show why auto
  picks what it picks on this CPU.

Generating 384 tokens per image takes minutes on a CPU, so time is measured in parts and added up.
The shortcuts, all printed with the results:
1. prefill (vision encoder + text prefill + first token) is timed on one image at batch 1. It is
   compute-bound, so a batch of B costs B times as much: checked on the reduced model below (the
   printed "prefill batch-4 / batch-1 per image" ratio).
2. a decode step at batch B is timed by replicating the one prefilled KV cache B times and running
   single-token forward passes; each step is timed at the prefill's context length and at that
   length + 383 (the cache padded with copies of itself), and the mean of the two is the mean step
   over 384 tokens (a step's cost is linear in its context length). First step of each run dropped.
3. the old way (float16 is emulated here and 10-100x slower) and the bfloat16 reference are timed
   on a reduced model (1 vision block, 1 deepstack merger, 1 text layer, everything else full size)
   with every block, merger and layer timed by hooks, then scaled per block to the full depth. The
   same scaling applied to the engine's dtype is compared with the engine's full-model measurement
   (the printed "extrapolation check" ratio), so its error is visible.
Seconds per image = prefill + 384 x (decode step at batch B) / B.

The compute floor: the model's multiply-adds per image (counted from the architecture: vision
encoder, mergers, text prefill with causal attention, 384 decode steps with growing attention,
lm_head once per token) divided by this machine's best measured matrix-multiply rate (float32 or
bfloat16, nn.Linear shapes of this model). Also printed: the weight-streaming time of a decode step
from the measured memory bandwidth, the other bound at small batch.

Writes bench/results/engine-cpu.json (--quick: engine-cpu-quick.json) and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import torch

from bench.engine_common import (
    NEW_TOKENS,
    ModuleTimer,
    base_of,
    bench_processor,
    flops_per_image,
    format_table,
    machine_description,
    random_model,
    reduced,
    results_dir,
    weight_bytes_per_step,
    write_json,
)
from consumer.engine.base import GenerationRequest
from consumer.engine.device import dtype_name, resolve_dtype
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 text / 4 vision layers, 512x384 images")
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--steps", type=int, default=3, help="decode steps timed per point (after one dropped)")
    parser.add_argument("--skip-bf16", action="store_true", help="leave out the bfloat16 reference row")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # random weights must not hit slow denormal arithmetic
    arch = reduced(REAL_2B, vision_depth=4, text_layers=4) if args.quick else REAL_2B
    image_size = (512, 384) if args.quick else (1024, 768)
    batches = [int(b) for b in args.batches.split(",")]
    notes: list[str] = []
    wall = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - wall:6.0f} s] {text}", flush=True)

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
    settings = Settings.from_environ({}, base_model_id="random-weights", max_new_tokens=NEW_TOKENS)
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
    engine.warm_up()  # the service's own warm-up: one 2-token generation on a small image
    engine_static = engine.kv_cache_implementation() == "static"
    say(f"engine KV cache: {engine.kv_cache_implementation()} (KV_CACHE=auto); the old way: dynamic")
    engine_prefill, cache = prefill(model, inputs)
    say(f"engine prefill {engine_prefill:.1f} s")
    engine_steps = {}
    for batch in batches:
        engine_steps[batch] = decode_mean_step(model, cache, batch, args.steps, static=engine_static)
        say(
            f"engine decode step at batch {batch}: {engine_steps[batch][1]:.3f} s (start) / "
            f"{engine_steps[batch][2]:.3f} s (end of {NEW_TOKENS})"
        )
    del model, engine, cache
    gc.collect()

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

    # 5. per image
    best_rate = max(rates["float32"], rates["bfloat16"])
    floor = (flops["prefill"] + flops["decode"]) / (best_rate * 1e9)
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
    for batch, (step, start, end) in engine_steps.items():
        configs.append(
            {
                "name": "engine",
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
    best = min((c for c in configs if c["name"] == "engine"), key=lambda c: c["seconds_per_image"])

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
    weights_s = weight_bytes_per_step(arch, engine_dtype) / (bandwidth * 1e9)
    notes += [
        "prefill timed at batch 1 and taken as linear in batch (compute-bound); on the reduced model a batch "
        f"of 4 costs {check['prefill_batch_ratio']:.2f}x batch 1 per image",
        "decode steps: one prefilled KV cache replicated B times (the engine's rows: a preallocated static "
        "cache, its CPU default; the old way, the bfloat16 reference and the scaling check: a dynamic one); "
        "mean of the steps at context "
        f"{visual_tokens + text_tokens} and {visual_tokens + text_tokens + NEW_TOKENS - 1}; EOS never consulted",
        f"old way and bfloat16: timed on 1 vision block + 1 deepstack merger + 1 text layer, scaled per block; "
        f"the same scaling in {dtype_name(engine_dtype)} gives prefill {check['prefill']:.1f} s vs "
        f"{engine_prefill:.1f} s measured on the full model ({check['prefill'] / engine_prefill:.2f}x) and "
        f"decode step {check['decode_step_1']:.3f} s scaled (decoding as the old way does: dynamic cache, PyTorch's "
        f"default GEMM) vs {engine_steps.get(1, (float('nan'),))[0]:.3f} s measured (the engine: static cache, "
        "oneDNN for few-row matmuls)",
        f"compute floor: {(flops['prefill'] + flops['decode']) / 1e12:.2f} TFLOP per image at {best_rate:.0f} GFLOP/s "
        f"(best of float32 {rates['float32']:.0f}, bfloat16 {rates['bfloat16']:.0f}) = {floor:.1f} s/image; "
        "at bfloat16's rate alone it would be "
        f"{(flops['prefill'] + flops['decode']) / (rates['bfloat16'] * 1e9):.1f} s",
        f"weights streamed per decode step in {dtype_name(engine_dtype)}: "
        f"{weight_bytes_per_step(arch, engine_dtype) / 1e9:.1f} GB = {weights_s:.2f} s at {bandwidth:.1f} GB/s "
        f"({NEW_TOKENS * weights_s:.0f} s per image at batch 1, shared by the batch)",
    ]
    if args.quick:
        notes.insert(0, "QUICK: 4 text / 4 vision layers and 512x384 images; NOT the 2B model's numbers")
    title = (
        f"Qwen3-VL {'(quick: 4+4 layers)' if args.quick else '2B architecture'}, random weights, "
        f"{image_size[0]}x{image_size[1]} images ({visual_tokens} visual tokens), {NEW_TOKENS} new tokens, "
        f"{machine_description()['cpu']} ({torch.get_num_threads()} threads)"
    )
    print("\n" + title)
    print(format_table(headers, rows))
    for note in notes:
        print(f"- {note}")
    print(
        f"best: engine batch {best['batch']}: {best['speedup_vs_old']:.1f}x the old way, "
        f"{best['ratio_to_floor']:.2f}x the compute floor; total bench time {time.perf_counter() - wall:.0f} s"
    )

    stem = "engine-cpu-quick" if args.quick else "engine-cpu"
    path = write_json(
        f"{stem}.json",
        {
            "command": "python -m bench.engine_cpu" + (" --quick" if args.quick else ""),
            "quick": args.quick,
            "machine": machine_description(),
            "title": title,
            "image_size": image_size,
            "visual_tokens": visual_tokens,
            "text_tokens": text_tokens,
            "new_tokens": NEW_TOKENS,
            "engine_dtype": dtype_name(engine_dtype),
            "matmul_gflops": rates,
            "memory_gb_s": bandwidth,
            "flops_per_image": flops,
            "floor_seconds_per_image": floor,
            "configs": configs,
            "best": {"batch": best["batch"], "dtype": best["dtype"], "seconds_per_image": best["seconds_per_image"]},
            "speedup_vs_old": best["speedup_vs_old"],
            "ratio_to_floor": best["ratio_to_floor"],
            "extrapolation_check": {
                "prefill_scaled_s": check["prefill"],
                "prefill_measured_s": engine_prefill,
                "decode_step_scaled_s": check["decode_step_1"],
                "prefill_batch4_per_image_ratio": check["prefill_batch_ratio"],
            },
            "notes": notes,
            "bench_seconds": time.perf_counter() - wall,
        },
    )
    plot(configs, floor, title, results_dir() / f"{stem}.png")
    print(f"written to {path} and {stem}.png")
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
