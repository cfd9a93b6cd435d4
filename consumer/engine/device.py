"""Which device and dtype to run on: DEVICE and TORCH_DTYPE resolved against what this machine has."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch

from consumer.engine.invariant import Kernel, RowBlocks

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(requested: str) -> str:
    """DEVICE=auto tries cuda, then mps, then cpu; a requested device that is missing falls back to cpu."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
    if not available[requested]:
        logger.warning("DEVICE=%s requested but not available on this machine; falling back to cpu", requested)
        return "cpu"
    return requested


CpuFlavour = Literal["avx2", "avx512-bf16", "amx"]
"""What a CPU offers the model: bfloat16 in AMX tiles, bfloat16 dot products in AVX-512 (AVX512-BF16), or
neither ("avx2": bfloat16 and float16 are emulated, slower than float32)."""

# oneDNN's instruction-set names in rising order (ONEDNN_MAX_CPU_ISA); names on one line are aliases.
_ONEDNN_ISAS = (
    ("SSE41",),
    ("AVX",),
    ("AVX2",),
    ("AVX2_VNNI",),
    ("AVX2_VNNI_2",),
    ("AVX512_CORE",),
    ("AVX512_CORE_VNNI",),
    ("AVX512_CORE_BF16",),
    ("AVX10_1_512", "AVX512_CORE_FP16"),
    ("AVX10_1_512_AMX", "AVX512_CORE_AMX"),
    ("AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16"),
    ("AVX10_2_512",),
    ("AVX10_2_512_AMX_2",),
)
_ISA_RANK = {name: rank for rank, names in enumerate(_ONEDNN_ISAS) for name in names}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as the kernel lists them; empty where there is no /proc/cpuinfo."""
    try:
        line = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.partition(":")[2].split())


def cpu_flavour(flags: set[str] | None = None, max_isa: str | None = None) -> CpuFlavour:
    """Which flavour this CPU is for the model: its flags, capped by oneDNN's ONEDNN_MAX_CPU_ISA.

    oneDNN runs PyTorch's bfloat16 matmuls on CPUs; with ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 it
    may not use the bfloat16 instructions the CPU has, and bfloat16 is emulated as on an AVX2 CPU. So
    the cap counts (`make test-flavours` uses it to run the suite as another flavour would).
    """
    flags = cpu_flags() if flags is None else flags
    if max_isa is None:
        max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    cap = _ISA_RANK.get(max_isa.strip().upper(), len(_ONEDNN_ISAS))  # DEFAULT, ALL or unset: no cap
    if "amx_bf16" in flags and cap >= _ISA_RANK["AVX512_CORE_AMX"]:
        return "amx"
    if "avx512_bf16" in flags and cap >= _ISA_RANK["AVX512_CORE_BF16"]:
        return "avx512-bf16"
    return "avx2"


def cpu_has_native_bf16(flavour: CpuFlavour | None = None) -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16, and oneDNN may use it).

    Without it PyTorch emulates bfloat16 matmuls and they run slower than float32 (bench/engine_cpu.py).
    """
    return (flavour or cpu_flavour()) != "avx2"


def cuda_has_native_bf16() -> bool:
    """True where the GPU computes bfloat16 in hardware (compute capability 8.0, Ampere, and newer).

    `torch.cuda.is_bf16_supported()` also answers True where PyTorch merely emulates bfloat16
    (`including_emulation` defaults to True: any CUDA 11+ GPU), which runs several times slower than
    float16 on a pre-Ampere GPU; emulation does not count here.
    """
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def attention_implementation(device: str, dtype: torch.dtype) -> str:
    """transformers' attention kernel for the model: flash_attention_2 where it can run, else sdpa.

    FlashAttention 2 needs an Ampere or newer GPU (compute capability 8.0), a float16 or bfloat16
    model, and a flash-attn build transformers accepts (`is_flash_attn_2_available`: the package's
    distribution and version, a CUDA PyTorch). That `import flash_attn` works says none of that.
    """
    if device != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "sdpa"
    major, _ = torch.cuda.get_device_capability()
    return "flash_attention_2" if major >= 8 else "sdpa"


def resolve_dtype(requested: str, device: str, flavour: CpuFlavour | None = None) -> torch.dtype:
    """TORCH_DTYPE=auto: the fastest dtype that computes correctly on `device`.

    cuda: bfloat16 where the GPU supports it, else float16. mps: float16. cpu: bfloat16 on CPUs with
    native bf16 matrix units, else float32 (float16 on a CPU is emulated and several times slower:
    the old service's default). An explicit value is honoured, with a warning where it is known to
    be slow; bfloat16 on a device that cannot run it is refused with a ValueError saying what to use.
    `flavour` is this CPU's (`cpu_flavour()`) unless given.
    """
    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
        if device == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16(flavour) else torch.float32
    dtype = DTYPES[requested]
    if device == "cuda" and dtype == torch.bfloat16 and not cuda_has_native_bf16():
        raise ValueError(
            "TORCH_DTYPE=bfloat16: this GPU has no bfloat16 units (compute capability below 8.0: PyTorch would "
            "emulate it, slowly); use float16 or auto"
        )
    if device == "mps" and dtype == torch.bfloat16 and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise ValueError("TORCH_DTYPE=bfloat16 needs macOS 14 or newer on mps; use float16 or auto")
    if device == "cpu" and dtype == torch.float16:
        logger.warning("TORCH_DTYPE=float16 on cpu is emulated and slow; TORCH_DTYPE=auto picks the fast one")
    if device == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16(flavour):
        logger.warning("TORCH_DTYPE=bfloat16 on a cpu without native bf16 is emulated and slower than float32")
    return dtype


def default_batch_size(device: str, flavour: CpuFlavour | None = None, dtype: torch.dtype | None = None) -> int:
    """BATCH_SIZE when it is unset: the batch that measured best per image where it was measured.

    cpu: per flavour, from `python -m bench.engine_cpu` on the 2B architecture (bench/results/
    engine-cpu-<flavour>.json; bench/README.md). avx2 (float32): 16, 61 s/image against 56 at 32, but a
    batch-32 KV cache (9.2 GB) beside the 8.5 GB model needs more than 16 GB. `flavour` is this CPU's
    unless given; `dtype` is the model's (float32 on a bfloat16 CPU batches as on avx2).
    cuda and mps: 8 until bench/engine_gpu.py has run on a GPU.
    """
    if device != "cpu":
        return 8
    flavour = flavour or cpu_flavour()
    if dtype in (None, torch.bfloat16) and flavour in _BF16_BATCH:
        return _BF16_BATCH[flavour]
    return 16


_BF16_BATCH: dict[CpuFlavour, int] = {"amx": 16, "avx512-bf16": 16}
"""default_batch_size for bfloat16 on CPUs that compute it natively (bench/README.md, engine section)."""

BF16_DECODE_ROWS: dict[CpuFlavour, int] = {"amx": 16, "avx512-bf16": 8, "avx2": 16}
"""decode_row_blocks for bfloat16 on CPUs: the row count of every decode matmul, per flavour.

A block's weights are read once whatever its rows, so more rows serve a batch with fewer passes over
the weights, while a block's arithmetic grows with its rows and is paid even for padding. The balance
is where multiplying a block takes as long as reading its weights: about rate / bandwidth rows (a
decode step does 2 FLOP per weight and row, and a bfloat16 weight is 2 bytes). AMX (this project's
Xeon: 0.8-2 TFLOP/s, 20-23 GB/s): 16 rows cost about what 1 does, 32 cost more (bench/README.md).
AVX512-BF16 (the issue's EPYC: 419 GFLOP/s, about 50 GB/s; imitated on the Xeon: 131 GFLOP/s, 20 GB/s):
about 8. avx2 emulates bfloat16 (TORCH_DTYPE=auto picks float32 there): 16, unmeasured."""


def decode_row_blocks(
    device: str,
    dtype: torch.dtype,
    flavour: CpuFlavour | None = None,
    onednn: bool = False,
    rows: int | None = None,
) -> RowBlocks:
    """How many rows each decode-step matmul runs on under BATCH_INVARIANT (consumer/engine/invariant.py).

    A kernel sums a row in an order it picks by the number of rows it is given; a row's result is the
    same for every row count within one choice. `python -m bench.cpu_kernels` (invariance section)
    measures which counts share one. `onednn`: DECODE_MATMUL lets oneDNN run on this CPU.
    - float32 on oneDNN: every count from 2 to 256 sums alike (1 row is a matrix-vector kernel of its
      own), so a lone row is padded to 2 and a batch of up to 256 runs as it is: a batch-32 step costs
      what it did before;
    - bfloat16 picks its blocking anew at almost every row count, in every kernel measured: calls run
      on exactly BF16_DECODE_ROWS[flavour] rows (padded, or split), on oneDNN with prepacked weights
      where the CPU has bfloat16 instructions (without them oneDNN cannot pack bfloat16);
    - anything else on a CPU: exactly 16 rows, PyTorch's kernel;
    - GPUs: exactly 64 rows (cuBLAS picks kernels by shape; not measured here: no GPU was available).
    `rows`, when given (DECODE_ROWS), fixes the count for any device and dtype.
    """
    native_bf16 = device == "cpu" and dtype == torch.bfloat16 and cpu_has_native_bf16(flavour)
    # oneDNN multiplies float32 on every CPU, bfloat16 only where the CPU has its instructions.
    kernel: Kernel = (
        "packed" if onednn and native_bf16 else "onednn" if onednn and dtype == torch.float32 else "default"
    )
    if rows is not None:
        return RowBlocks(rows, rows, kernel)
    if device != "cpu":
        return RowBlocks(64, 64)
    if kernel == "onednn":
        return RowBlocks(2, 256, kernel)
    if dtype == torch.bfloat16:
        fixed = BF16_DECODE_ROWS[flavour or cpu_flavour()]
        return RowBlocks(fixed, fixed, kernel)
    return RowBlocks(16, 16, kernel)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
