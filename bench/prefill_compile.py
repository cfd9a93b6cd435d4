"""What torch.compile (Inductor) would buy the CPU prefill, and what it would cost: an experiment.

    python -m bench.prefill_compile                          # the full 2B architecture, fixed shapes
    python -m bench.prefill_compile --vision 4 --text 4 --dynamic

Every vision block and text layer is compiled (`Module.compile`, Inductor with `freezing`: weights
become constants, so bfloat16 linears get oneDNN's prepacked kernels and the elementwise work around
them is fused). The same process then times the engine's BATCH_INVARIANT prefill of one 1024x768
diagram, eager and compiled in turns (the VM is shared: turns keep a busy moment from favouring one
side), and last, a diagram of another size (800x600) twice: its first call is what a new image size
costs a compiled replica. Random weights, TORCH_DTYPE=auto for this CPU.
Writes bench/results/prefill-compile-<flavour>[-dynamic].json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics

import torch
import torch._dynamo
import torch._inductor.config

from bench.engine_common import bench_processor, command_line, machine_description, random_model, reduced, write_json
from bench.engine_cpu import invariant_prefill
from consumer.engine.base import GenerationRequest
from consumer.engine.device import cpu_flavour, dtype_name, resolve_dtype
from consumer.engine.qwen import QwenVLEngine
from consumer.settings import Settings
from devtools.samples import sample_diagram
from devtools.tiny import REAL_2B


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", type=int, default=24, help="vision blocks (the real model has 24)")
    parser.add_argument("--text", type=int, default=28, help="text layers (the real model has 28)")
    parser.add_argument("--rounds", type=int, default=3, help="eager and compiled prefills, in turns")
    parser.add_argument("--dynamic", action="store_true", help="compile for any sequence length (dynamic=True)")
    parser.add_argument("--no-freezing", action="store_true", help="keep weights as parameters")
    args = parser.parse_args(argv)

    torch._inductor.config.freezing = not args.no_freezing
    # One compiled graph per module instance (and per shape): more than dynamo's default limit of 8.
    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 8192
    arch = reduced(REAL_2B, args.vision, args.text)
    dtype = resolve_dtype("auto", "cpu")
    processor, token_ids = bench_processor()
    settings = Settings.from_environ({}, base_model_id="random-weights")
    engine = QwenVLEngine.from_model(settings, random_model(arch, dtype, token_ids, lora="merged"), processor)
    assert engine.decoder is not None, "the experiment is on the BATCH_INVARIANT prefill"
    decoder = engine.decoder
    model = engine.model
    modules = [*model.model.visual.blocks, *model.model.language_model.layers]

    def inputs_for(size: tuple[int, int]) -> dict:
        return engine.collate([GenerationRequest(image=sample_diagram(0, size), prompt=settings.prompt)])

    inputs = inputs_for((1024, 768))
    with torch.inference_mode():
        invariant_prefill(decoder, inputs, 8)  # eager warm-up
        eager_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        for module in modules:
            module.compile(dynamic=args.dynamic)
        compiled = {module: module._compiled_call_impl for module in modules}
        compile_seconds = invariant_prefill(decoder, inputs, 8)[0]

        def use(on: bool) -> None:
            for module in modules:
                module._compiled_call_impl = compiled[module] if on else None

        seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for name in seconds:
                use(name == "compiled")
                seconds[name].append(invariant_prefill(decoder, inputs, 8)[0])
        use(True)
        other = inputs_for((800, 600))
        new_size = [invariant_prefill(decoder, other, 8)[0] for _ in range(2)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    flavour = cpu_flavour()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(
        f"{flavour}, {dtype_name(dtype)}, {args.vision} vision blocks + {args.text} text layers, 1024x768, "
        f"dynamic={args.dynamic}, freezing={not args.no_freezing}; load {os.getloadavg()[0]:.2f}"
    )
    print(f"first compiled prefill (compiling): {compile_seconds:.1f} s")
    for name, values in seconds.items():
        print(f"{name}: median {medians[name]:.2f} s, min {min(values):.2f} [{' '.join(f'{v:.2f}' for v in values)}]")
    print(f"compiled / eager (medians): {medians['compiled'] / medians['eager']:.2f}")
    print(f"800x600 when compiled: first {new_size[0]:.1f} s (compiling for the new size), then {new_size[1]:.2f} s")
    print(f"peak RSS: {eager_rss:.1f} GB eager, {peak_rss:.1f} GB after compiling")
    suffix = "-dynamic" if args.dynamic else ""
    path = write_json(
        f"prefill-compile-{flavour}{suffix}.json",
        {
            "command": command_line("python -m bench.prefill_compile", argv),
            "machine": machine_description(),
            "flavour": flavour,
            "dtype": dtype_name(dtype),
            "vision_blocks": args.vision,
            "text_layers": args.text,
            "dynamic": args.dynamic,
            "freezing": not args.no_freezing,
            "torch": torch.__version__,
            "first_compiled_prefill_seconds": compile_seconds,
            "prefill_seconds": seconds,
            "median_ratio_compiled_to_eager": medians["compiled"] / medians["eager"],
            "new_size_800x600_seconds": new_size,
            "peak_rss_gb": {"eager": eager_rss, "compiled": peak_rss},
            "load_average": os.getloadavg(),
        },
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
