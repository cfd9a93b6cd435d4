"""A decode step's kernels on this CPU: the engine's choices against PyTorch's and transformers' defaults.

    python -m bench.cpu_kernels        # about a minute and a half

1. Few-row float32 matmuls: PyTorch's default GEMM (MKL) against oneDNN (DECODE_MATMUL).

A decode step multiplies each weight matrix of the model by one row per image in the batch; prefill
by hundreds or thousands of rows. For the linear shapes of a Qwen3-VL-2B text layer (q, k/v, o,
gate/up, down: summed per layer) and its lm_head, at 1 to 2048 rows, this times `F.linear` against
`torch.ops.mkldnn._linear_pointwise` on the same weight tensor, which is what
consumer/engine/onednn.py chooses between (oneDNN up to ROWS_LIMIT rows).

2. Attention for one new token per image (SDPA, as transformers calls it for a decode step: the
query packed per KV head, a boolean mask) at batch 16 over a 1024x768 diagram's context half-way
through 384 new tokens (1062 filled positions): over the filled prefix (FilledStaticCache,
consumer/engine/kv_cache.py) against the whole preallocated prompt + 384 (1254; transformers'
StaticCache).

Random inputs; each kernel runs in a loop for about 0.7 s. Writes bench/results/cpu-kernels.json.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.engine_common import format_table, machine_description, write_json
from consumer.engine import onednn

# (in, out) of each linear layer in one Qwen3-VL-2B text layer; gate and up share a shape.
LAYER_SHAPES = [(2048, 2048), (2048, 1024), (2048, 1024), (2048, 2048), (2048, 6144), (2048, 6144), (6144, 2048)]
LM_HEAD = (2048, 151936)
ROWS = [1, 4, 16, 32, 64, 128, 256, 512, 2048]


def seconds(fn, budget: float = 0.7) -> float:
    fn()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget or runs < 2:
        fn()
        runs += 1
    return (time.perf_counter() - started) / runs


def both(rows: int, shape: tuple[int, int]) -> tuple[float, float]:
    inner, outer = shape
    weight, x = torch.randn(outer, inner) * 0.02, torch.randn(rows, inner)
    default = seconds(lambda: F.linear(x, weight))
    dnnl = seconds(lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""))
    return default, dnnl


def attention_ms(batch: int = 16, filled: int = 1062, preallocated: int = 1254) -> dict:
    """One text layer's decode attention (16 query heads on 8 KV heads of 128), filled vs preallocated."""
    query = torch.randn(batch, 8, 2, 128)  # transformers' pack_gqa: (batch, kv heads, queries per kv head, dim)
    keys, values = torch.randn(batch, 8, preallocated, 128), torch.randn(batch, 8, preallocated, 128)
    mask = torch.zeros(batch, 1, 1, preallocated, dtype=torch.bool)
    mask[..., :filled] = True
    sdpa = torch.nn.functional.scaled_dot_product_attention
    whole = seconds(lambda: sdpa(query, keys, values, attn_mask=mask, scale=128**-0.5))
    prefix = seconds(
        lambda: sdpa(query, keys[:, :, :filled], values[:, :, :filled], attn_mask=mask[..., :filled], scale=128**-0.5)
    )
    return {
        "batch": batch,
        "filled": filled,
        "preallocated": preallocated,
        "filled_ms": prefix * 1e3,
        "preallocated_ms": whole * 1e3,
    }


@torch.inference_mode()
def main() -> int:
    if not onednn.available():
        print("this PyTorch build has no oneDNN")
        return 1
    torch.manual_seed(0)
    results, rows_out = [], []
    for rows in ROWS:
        default = dnnl = 0.0
        for shape in dict.fromkeys(LAYER_SHAPES):  # each distinct shape once, weighted by its count
            count = LAYER_SHAPES.count(shape)
            a, b = both(rows, shape)
            default, dnnl = default + count * a, dnnl + count * b
        head = both(rows, LM_HEAD) if rows <= 64 else (float("nan"), float("nan"))
        layer_flops = 2 * rows * sum(i * o for i, o in LAYER_SHAPES)
        results.append(
            {
                "rows": rows,
                "layer_default_ms": default * 1e3,
                "layer_onednn_ms": dnnl * 1e3,
                "lm_head_default_ms": head[0] * 1e3,
                "lm_head_onednn_ms": head[1] * 1e3,
                "layer_default_gflops": layer_flops / default / 1e9,
                "layer_onednn_gflops": layer_flops / dnnl / 1e9,
            }
        )
        rows_out.append(
            [
                rows,
                f"{default * 1e3:.1f}",
                f"{dnnl * 1e3:.1f}",
                f"{default / dnnl:.2f}x",
                f"{layer_flops / default / 1e9:.0f} / {layer_flops / dnnl / 1e9:.0f}",
                f"{head[0] * 1e3:.0f} / {head[1] * 1e3:.0f}" if rows <= 64 else "-",
                "oneDNN" if rows <= onednn.ROWS_LIMIT else "default",
            ]
        )
        print(f"{rows} rows done", flush=True)
    attention = attention_ms()
    print(
        f"attention, one layer at batch 16: {attention['filled_ms']:.2f} ms over {attention['filled']} filled "
        f"positions, {attention['preallocated_ms']:.2f} ms over all {attention['preallocated']} preallocated"
    )
    print(
        format_table(
            [
                "rows",
                "text layer, default ms",
                "oneDNN ms",
                "oneDNN speed-up",
                "GFLOP/s default / oneDNN",
                "lm_head ms default / oneDNN",
                "DECODE_MATMUL=auto uses",
            ],
            rows_out,
        )
    )
    path = write_json(
        "cpu-kernels.json",
        {
            "command": "python -m bench.cpu_kernels",
            "machine": machine_description(),
            "rows_limit": onednn.ROWS_LIMIT,
            "matmul": results,
            "attention": attention,
        },
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
