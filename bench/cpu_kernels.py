"""A decode step's kernels on this CPU: what the engine chooses, against the alternatives.

    python -m bench.cpu_kernels                      # every section: a few minutes
    python -m bench.cpu_kernels --sections bf16,invariance
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python -m bench.cpu_kernels   # as an AVX512-BF16 CPU

Writes bench/results/cpu-kernels-<flavour>.json (the flavour as consumer.engine.device.cpu_flavour
sees it; --out DIR to write elsewhere). Random inputs, the shapes of Qwen3-VL-2B's text layers (q,
k/v, o, gate/up, down, summed per layer) and its lm_head. Each timing is the best of several rounds
that visit every case in turn, so a burst of load from another process slows one round, not a case.

Sections:
- fp32: few-row float32 matmuls, PyTorch's default GEMM (MKL) against oneDNN on the same weight
  tensor (DECODE_MATMUL; consumer/engine/onednn.py), 1 to 2048 rows.
- bf16: a decode step's bfloat16 matmuls at 1 to 64 rows: PyTorch's F.linear, oneDNN on the plain
  weight, oneDNN on weights reordered once into its blocked layout (the engine's "packed" kernel, q/k/v
  and gate/up concatenated), against this machine's streaming read rate: how far each is from
  reading its weights at memory speed.
- invariance: BATCH_INVARIANT rests on this. For each kernel and row count: is row r's result, bit
  for bit, what it is at every other row count the engine may call it with, whatever the other
  rows hold and wherever the row sits? Reported per kernel as the row counts that agree.
- patch-embedding: the vision encoder's Conv3d patch embedding of a 1024x768 image (3072 patches of
  2x16x16) against the same product as one matmul (consumer/engine/qwen.py PatchEmbedding).
- attention: one text layer's decode attention at batch 16 over a 1024x768 diagram's context
  half-way through 384 new tokens (1062 filled positions). float32: over the filled prefix
  (FilledStaticCache) against the whole preallocated prompt + 384 (transformers' StaticCache).
  bfloat16, over 28 layers' caches as a real step reads them: per sequence (the engine's
  BATCH_INVARIANT decode) with queries packed per KV head or SDPA's enable_gqa, all sequences in one
  call (equal lengths only), and a paged form from PyTorch ops (any lengths, batch-invariant),
  against the streaming read rate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench.engine_common import command_line, format_table, machine_description, write_json
from consumer.engine import onednn
from consumer.engine.device import cpu_flavour

# (in, out) of each linear layer in one Qwen3-VL-2B text layer; gate and up share a shape.
LAYER_SHAPES = [(2048, 2048), (2048, 1024), (2048, 1024), (2048, 2048), (2048, 6144), (2048, 6144), (6144, 2048)]
# The same layer as the engine's packed kernel runs it: q/k/v in one call, o, gate/up in one, down.
FUSED_SHAPES = [(2048, 4096), (2048, 2048), (2048, 12288), (6144, 2048)]
LM_HEAD = (2048, 151936)
FP32_ROWS = [1, 4, 16, 32, 64, 128, 256, 512, 2048]
BF16_ROWS = [1, 4, 8, 16, 32, 64]
INVARIANCE_ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 48, 64, 100, 128, 200, 256]


def best_of(cases: dict[str, Callable[[], object]], rounds: int = 6, calls: int = 3) -> dict[str, float]:
    """Seconds per call of each case: the fastest of `rounds` x `calls`, visiting the cases in turn."""
    for run in cases.values():
        run()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, run in cases.items():
            for _ in range(calls):
                started = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - started)
    return best


def read_rate() -> float:
    """GB/s of streaming reads (a sum over 512 MiB): what a memory-bound kernel can reach."""
    data = torch.ones(128 * 1024 * 1024)
    return data.numel() * 4 / best_of({"sum": data.sum}, rounds=3)["sum"] / 1e9


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    result: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return result


def packed(weight: torch.Tensor) -> torch.Tensor:
    packed_weight: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    return packed_weight


# -- fp32 -------------------------------------------------------------------------------------------
def fp32_section() -> dict:
    weights = {shape: torch.randn(shape[1], shape[0]) * 0.02 for shape in {*LAYER_SHAPES, LM_HEAD}}
    results, table = [], []
    for rows in FP32_ROWS:
        x = torch.randn(rows, 6144)
        cases: dict[str, Callable[[], object]] = {
            "default": lambda x=x: [F.linear(x[:, :i], weights[(i, o)]) for i, o in LAYER_SHAPES],
            "onednn": lambda x=x: [onednn_linear(x[:, :i].contiguous(), weights[(i, o)]) for i, o in LAYER_SHAPES],
        }
        if rows <= 64:
            cases["head default"] = lambda x=x: F.linear(x[:, :2048], weights[LM_HEAD])
            cases["head onednn"] = lambda x=x: onednn_linear(x[:, :2048].contiguous(), weights[LM_HEAD])
        best = best_of(cases, rounds=3)
        flops = 2 * rows * sum(i * o for i, o in LAYER_SHAPES)
        head = (best.get("head default", float("nan")), best.get("head onednn", float("nan")))
        results.append(
            {
                "rows": rows,
                "layer_default_ms": best["default"] * 1e3,
                "layer_onednn_ms": best["onednn"] * 1e3,
                "lm_head_default_ms": head[0] * 1e3,
                "lm_head_onednn_ms": head[1] * 1e3,
                "layer_default_gflops": flops / best["default"] / 1e9,
                "layer_onednn_gflops": flops / best["onednn"] / 1e9,
            }
        )
        table.append(
            [
                rows,
                f"{best['default'] * 1e3:.1f}",
                f"{best['onednn'] * 1e3:.1f}",
                f"{best['default'] / best['onednn']:.2f}x",
                f"{flops / best['default'] / 1e9:.0f} / {flops / best['onednn'] / 1e9:.0f}",
                f"{head[0] * 1e3:.0f} / {head[1] * 1e3:.0f}" if rows <= 64 else "-",
            ]
        )
        print(f"fp32: {rows} rows done", flush=True)
    print(
        format_table(
            ["rows", "text layer, default ms", "oneDNN ms", "oneDNN speed-up", "GFLOP/s default / oneDNN", "lm_head"],
            table,
        )
    )
    return {"rows_limit": onednn.ROWS_LIMIT, "matmul": results}


# -- bf16 -------------------------------------------------------------------------------------------
def bf16_section(stream_gb_s: float) -> dict:
    dtype = torch.bfloat16
    weights = {shape: (torch.randn(shape[1], shape[0]) * 0.02).to(dtype) for shape in {*LAYER_SHAPES, *FUSED_SHAPES}}
    head = (torch.randn(LM_HEAD[1], LM_HEAD[0]) * 0.02).to(dtype)
    packed_weights = {shape: packed(weight) for shape, weight in weights.items()}
    packed_head = packed(head)
    layer_bytes = sum(i * o for i, o in LAYER_SHAPES) * 2
    head_bytes = head.numel() * 2
    results, table = [], []
    for rows in BF16_ROWS:
        x = {width: torch.randn(rows, width).to(dtype) for width in (2048, 6144)}
        best = best_of(
            {
                "F.linear": lambda x=x: [F.linear(x[i], weights[(i, o)]) for i, o in LAYER_SHAPES],
                "oneDNN": lambda x=x: [onednn_linear(x[i], weights[(i, o)]) for i, o in LAYER_SHAPES],
                "packed": lambda x=x: [onednn_linear(x[i], packed_weights[(i, o)]) for i, o in FUSED_SHAPES],
                "head F.linear": lambda x=x: F.linear(x[2048], head),
                "head packed": lambda x=x: onednn_linear(x[2048], packed_head),
            }
        )
        entry = {"rows": rows}
        for name, seconds in best.items():
            size = head_bytes if name.startswith("head") else layer_bytes
            entry[f"{name} ms"] = seconds * 1e3
            entry[f"{name} GB/s"] = size / seconds / 1e9
        results.append(entry)
        table.append(
            [
                rows,
                *(f"{best[n] * 1e3:.1f} ({layer_bytes / best[n] / 1e9:.0f})" for n in ("F.linear", "oneDNN", "packed")),
                *(f"{best[n] * 1e3:.0f} ({head_bytes / best[n] / 1e9:.0f})" for n in ("head F.linear", "head packed")),
            ]
        )
        print(f"bf16: {rows} rows done", flush=True)
    print(f"bfloat16 decode matmuls, ms (GB/s of weights read); streaming reads: {stream_gb_s:.1f} GB/s")
    print(
        format_table(
            ["rows", "text layer F.linear", "oneDNN", "oneDNN packed", "lm_head F.linear", "lm_head packed"], table
        )
    )
    return {"stream_gb_s": stream_gb_s, "matmul": results}


# -- invariance -------------------------------------------------------------------------------------
def agreeing_rows(
    multiply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, counts: list[int]
) -> dict[str, object]:
    """Which row counts compute each row as every other count does, bit for bit.

    Row r's result at each count is compared with its result at the largest count; a count agrees
    when all its rows match. Also, at 16, 64 and the largest count: rows moved to other positions,
    beside other rows, must come out the same (`position_and_company_matter` when they do not).
    """
    largest = max(counts)
    reference = multiply(x[:largest].contiguous())
    agreeing = [count for count in counts if torch.equal(multiply(x[:count].contiguous()), reference[:count])]
    company = False
    for count in (16, 64, largest):
        alone = multiply(x[:count].contiguous())
        shuffled = torch.randperm(count, generator=torch.Generator().manual_seed(count))
        others = torch.randn_like(x[:count])
        mixed = torch.cat([x[shuffled[: count // 2]], others[: count - count // 2]]).contiguous()
        company = company or not torch.equal(multiply(mixed)[: count // 2], alone[shuffled[: count // 2]])
    return {"agreeing_counts": agreeing, "position_and_company_matter": company}


def invariance_section() -> dict:
    """Per engine kernel, the row counts it computes a row alike at (on layer and lm_head shapes)."""
    results: dict[str, dict] = {}
    table = []
    shapes = [*dict.fromkeys(LAYER_SHAPES), LM_HEAD]
    for dtype in (torch.float32, torch.bfloat16):
        for kernel in ("F.linear", "oneDNN", "packed"):
            agree: set[int] | None = None
            company = False
            for inner, outer in shapes:
                weight = (torch.randn(outer, inner) * 0.02).to(dtype)
                operand = packed(weight) if kernel == "packed" else weight
                x = torch.randn(max(INVARIANCE_ROWS), inner).to(dtype)
                if kernel == "F.linear":
                    found = agreeing_rows(lambda rows, w=weight: F.linear(rows, w), x, INVARIANCE_ROWS)
                else:
                    found = agreeing_rows(lambda rows, w=operand: onednn_linear(rows, w), x, INVARIANCE_ROWS)
                counts = set(found["agreeing_counts"])  # type: ignore[call-overload]
                agree = counts if agree is None else agree & counts
                company = company or bool(found["position_and_company_matter"])
            name = f"{str(dtype).removeprefix('torch.')} {kernel}"
            results[name] = {"agreeing_counts": sorted(agree or ()), "position_and_company_matter": company}
            table.append([name, _ranges(sorted(agree or ())), "yes" if company else "no"])
            print(f"invariance: {name} done", flush=True)
    print(f"row counts (of {INVARIANCE_ROWS}) that compute every row as {max(INVARIANCE_ROWS)} rows do:")
    print(format_table(["kernel", "agreeing row counts", "position or other rows change a row"], table))
    return results


def _ranges(counts: list[int]) -> str:
    if not counts:
        return "none"
    spans, start, previous = [], counts[0], counts[0]
    order = {c: i for i, c in enumerate(INVARIANCE_ROWS)}
    for count in counts[1:]:
        if order[count] != order[previous] + 1:
            spans.append((start, previous))
            start = count
        previous = count
    spans.append((start, previous))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


# -- patch embedding --------------------------------------------------------------------------------
def patch_embedding_section() -> dict:
    """Conv3d (kernel = stride) against F.linear over the flattened patches, float32 and bfloat16."""
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        conv = torch.nn.Conv3d(3, 1024, kernel_size=(2, 16, 16), stride=(2, 16, 16)).to(dtype)
        patches = torch.randn(3072, 3, 2, 16, 16).to(dtype)
        best = best_of(
            {
                "conv3d": lambda conv=conv, patches=patches: conv(patches),
                "linear": lambda conv=conv, patches=patches: F.linear(
                    patches.flatten(1), conv.weight.flatten(1), conv.bias
                ),
            },
            rounds=3,
            calls=1,
        )
        name = str(dtype).removeprefix("torch.")
        result[name] = {"conv3d_ms": best["conv3d"] * 1e3, "linear_ms": best["linear"] * 1e3}
        print(f"patch embedding, {name}: Conv3d {best['conv3d'] * 1e3:.0f} ms, matmul {best['linear'] * 1e3:.1f} ms")
    return result


# -- attention --------------------------------------------------------------------------------------
PAGE = 128  # positions per page of the paged form below


def grouped_query_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """SDPA with its own grouped-query support: 16 query heads on 8 KV heads, no repeat, no packing."""
    return F.scaled_dot_product_attention(query, keys, values, scale=128**-0.5, enable_gqa=True)


def paged_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Decode attention of every sequence in one set of calls, each over its own length, from PyTorch ops alone.

    query (n, kv heads, queries per kv head, dim); keys and values (n, kv heads, positions, dim), the
    positions a multiple of PAGE and zero past each sequence's length. Every page is one fixed-shape
    matmul and sums run in page order (cumsum), so a row's result depends on its own cache only: the
    batch-invariant shape of a varlen kernel, to measure what PyTorch's own ops make of it.
    """
    count, kv_heads, positions, dim = keys.shape
    pages = positions // PAGE
    key_pages = keys.unflatten(2, (pages, PAGE))  # (n, kv, pages, PAGE, dim)
    scores = torch.matmul(query.unsqueeze(2), key_pages.transpose(-1, -2)).float() * dim**-0.5
    filled = torch.arange(positions).view(pages, 1, PAGE) < lengths.view(-1, 1, 1, 1, 1)
    scores = scores.masked_fill(~filled, float("-inf"))
    page_max = scores.amax(-1, keepdim=True)
    page_max = torch.where(page_max.isinf(), torch.zeros_like(page_max), page_max)
    weights = torch.exp(scores - page_max)
    page_sum = weights.cumsum(-1)[..., -1:]
    page_out = torch.matmul(weights.to(values.dtype), values.unflatten(2, (pages, PAGE))).float()
    rescale = torch.exp(page_max - page_max.amax(2, keepdim=True))
    out = (rescale * page_out).cumsum(2)[:, :, -1] / (rescale * page_sum).cumsum(2)[:, :, -1]
    return out.to(query.dtype)


def attention_section(
    stream_gb_s: float, batch: int = 16, filled: int = 1062, preallocated: int = 1254, layers: int = 28
) -> dict:
    """A decode step's attention (16 query heads on 8 KV heads of 128).

    float32: one layer, transformers' batched SDPA over the preallocated cache or its filled prefix.
    bfloat16: every one of the text model's `layers`, each with its own caches as in a real step (a
    layer's caches fit a large L3, the step's do not), timed per layer.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    scale = 128**-0.5
    query = torch.randn(batch, 8, 2, 128)  # transformers' pack_gqa: (batch, kv heads, queries per kv head, dim)
    keys, values = torch.randn(batch, 8, preallocated, 128), torch.randn(batch, 8, preallocated, 128)
    mask = torch.zeros(batch, 1, 1, preallocated, dtype=torch.bool)
    mask[..., :filled] = True
    # Each layer's caches side by side, zero past `filled` and padded to whole pages; the per-sequence
    # cases (the engine's BATCH_INVARIANT decode) read each sequence's slice of them.
    paged_length = -(-preallocated // PAGE) * PAGE
    caches = []
    for _ in range(layers):
        layer_k = torch.zeros(batch, 8, paged_length, 128, dtype=torch.bfloat16)
        layer_v = torch.zeros_like(layer_k)
        layer_k[:, :, :filled], layer_v[:, :, :filled] = torch.randn(2, batch, 8, filled, 128).bfloat16()
        caches.append((layer_k, layer_v))
    rows_q = torch.randn(batch, 16, 1, 128).bfloat16()
    lengths = torch.full((batch,), filled)
    visible = -(-filled // PAGE) * PAGE

    def every_layer(attend: Callable[[torch.Tensor, torch.Tensor], object]) -> Callable[[], object]:
        return lambda: [attend(layer_k, layer_v) for layer_k, layer_v in caches]

    def per_sequence(attend: Callable[[int, torch.Tensor, torch.Tensor], object]) -> Callable[[], object]:
        return every_layer(
            lambda k, v: [attend(r, k[r : r + 1, :, :filled], v[r : r + 1, :, :filled]) for r in range(batch)]
        )

    best = best_of(
        {
            "fp32 batched, preallocated": lambda: sdpa(query, keys, values, attn_mask=mask, scale=scale),
            "fp32 batched, filled": lambda: sdpa(
                query, keys[:, :, :filled], values[:, :, :filled], attn_mask=mask[..., :filled], scale=scale
            ),
            "bf16 per sequence, pack_gqa": per_sequence(
                lambda r, k, v: sdpa(rows_q[r].reshape(1, 8, 2, 128), k, v, scale=scale)
            ),
            "bf16 per sequence, enable_gqa": per_sequence(
                lambda r, k, v: grouped_query_attention(rows_q[r : r + 1], k, v)
            ),
            "bf16 all sequences in one call, enable_gqa (equal lengths only)": every_layer(
                lambda k, v: grouped_query_attention(rows_q, k[:, :, :filled], v[:, :, :filled])
            ),
            "bf16 paged, PyTorch ops (any lengths)": every_layer(
                lambda k, v: paged_attention(
                    rows_q.view(batch, 8, 2, 128), k[:, :, :visible], v[:, :, :visible], lengths
                )
            ),
        },
        rounds=3,
        calls=1,
    )
    kv_bytes = {"fp32": 2 * batch * 8 * filled * 128 * 4, "bf16": 2 * batch * 8 * filled * 128 * 2}
    result: dict = {"batch": batch, "filled": filled, "preallocated": preallocated, "layers": layers}
    result["stream_gb_s"] = stream_gb_s
    for name, seconds in best.items():
        per_layer = seconds if name.startswith("fp32") else seconds / layers
        result[f"{name} ms"] = per_layer * 1e3
        result[f"{name} GB/s"] = kv_bytes[name[:4]] / per_layer / 1e9
        print(
            f"attention, one layer at batch {batch}, {filled} positions: {name} {per_layer * 1e3:.2f} ms "
            f"({kv_bytes[name[:4]] / per_layer / 1e9:.1f} GB/s of keys and values)"
        )
    # The paged form is a faithful attention, and a row's bits do not depend on the other rows.
    layer_k, layer_v = caches[0]
    paged = paged_attention(rows_q.view(batch, 8, 2, 128), layer_k, layer_v, lengths).reshape(batch, 16, 1, 128)
    reference = torch.cat(
        [
            grouped_query_attention(rows_q[r : r + 1], layer_k[r : r + 1, :, :filled], layer_v[r : r + 1, :, :filled])
            for r in range(batch)
        ]
    )
    alone = paged_attention(
        rows_q[:1].view(1, 8, 2, 128), layer_k[:1, :, :visible], layer_v[:1, :, :visible], lengths[:1]
    )
    result["paged max abs difference from SDPA"] = (paged.float() - reference.float()).abs().max().item()
    result["paged row alone equals the row in the batch"] = torch.equal(alone.reshape(16, 1, 128), paged[0])
    print(
        f"paged form: max abs difference from SDPA {result['paged max abs difference from SDPA']:.2g}; a row alone "
        f"{'equals' if result['paged row alone equals the row in the batch'] else 'DIFFERS FROM'} the row in the batch"
    )
    return result


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="fp32,bf16,invariance,patch-embedding,attention")
    parser.add_argument("--out", type=Path, default=None, help="directory for the results (default: bench/results)")
    args = parser.parse_args(argv)
    if not onednn.available():
        print("this PyTorch build has no oneDNN")
        return 1
    torch.manual_seed(0)
    sections = args.sections.split(",")
    flavour = cpu_flavour()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"CPU flavour {flavour}; load average {' '.join(load)}", flush=True)
    stream = read_rate()
    payload: dict = {
        "command": command_line("python -m bench.cpu_kernels", argv),
        "flavour": flavour,
        "machine": machine_description(),
        "load_average_start": load,
        "stream_gb_s": stream,
    }
    if "fp32" in sections:
        payload["fp32"] = fp32_section()
    if "bf16" in sections:
        payload["bf16"] = bf16_section(stream)
    if "invariance" in sections:
        payload["invariance"] = invariance_section()
    if "patch-embedding" in sections:
        payload["patch_embedding"] = patch_embedding_section()
    if "attention" in sections:
        payload["attention"] = attention_section(stream)
    payload["load_average_end"] = Path("/proc/loadavg").read_text().split()[:3] if load else []
    path = write_json(f"cpu-kernels-{flavour}.json", payload, directory=args.out)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
