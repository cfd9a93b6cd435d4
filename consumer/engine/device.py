"""Which device and dtype to run on: DEVICE and TORCH_DTYPE resolved against what this machine has."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

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


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16).

    Without it PyTorch emulates bfloat16 matmuls and they run slower than float32 (bench/engine_cpu.py).
    """
    try:
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    """TORCH_DTYPE=auto: the fastest dtype that computes correctly on `device`.

    cuda: bfloat16 where the GPU supports it, else float16. mps: float16. cpu: bfloat16 on CPUs with
    native bf16 matrix units, else float32 (float16 on a CPU is emulated and several times slower:
    the old service's default). An explicit value is honoured, with a warning where it is known to
    be slow; bfloat16 on a device that cannot run it is refused with a ValueError saying what to use.
    """
    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    dtype = DTYPES[requested]
    if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("TORCH_DTYPE=bfloat16: this GPU has no bfloat16 support; use float16 or auto")
    if device == "mps" and dtype == torch.bfloat16 and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise ValueError("TORCH_DTYPE=bfloat16 needs macOS 14 or newer on mps; use float16 or auto")
    if device == "cpu" and dtype == torch.float16:
        logger.warning("TORCH_DTYPE=float16 on cpu is emulated and slow; TORCH_DTYPE=auto picks the fast one")
    if device == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        logger.warning("TORCH_DTYPE=bfloat16 on a cpu without native bf16 is emulated and slower than float32")
    return dtype


def default_batch_size(device: str) -> int:
    """BATCH_SIZE when it is unset: the batch that measured best per image where it was measured.

    cpu: 16. `python -m bench.engine_cpu` on the 2B architecture: 69 s/image at 8, 61 at 16, 56 at
    32; 16 keeps the model, its batch-16 KV cache (4.6 GB) and prefill within 16 GB, and a batch
    within about 16 minutes. cuda and mps: 8 until bench/engine_gpu.py has run on a GPU.
    """
    return 16 if device == "cpu" else 8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
