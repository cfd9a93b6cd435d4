"""Run the test suite as the other CPU flavours would, on this machine: `make test-flavours`.

The machines this project runs on differ: AVX2-only CPUs emulate bfloat16, AVX512-BF16 CPUs multiply it
with AVX-512 instructions, AMX CPUs in tiles. TORCH_DTYPE=auto follows the flavour, and so do the
kernels PyTorch picks, so a test can pass on one machine and fail on another. A machine can imitate
the flavours below its own: ONEDNN_MAX_CPU_ISA caps the instructions oneDNN (PyTorch's CPU matmuls)
may use, and ATEN_CPU_CAPABILITY the vector width of PyTorch's own kernels. The service reads the
same cap when it picks its dtype (consumer/engine/device.py `cpu_flavour`), so `auto` follows.

    python -m devtools.flavours                 # the whole suite, once per flavour this CPU can imitate
    python -m devtools.flavours tests/unit -x   # pytest arguments pass through
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from consumer.engine.device import CpuFlavour, cpu_flavour

# What each flavour looks like to PyTorch, imitated from a higher one.
IMITATIONS: dict[CpuFlavour, dict[str, str]] = {
    "avx512-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
ORDER: tuple[CpuFlavour, ...] = ("avx2", "avx512-bf16", "amx")


def imitable(real: CpuFlavour) -> list[CpuFlavour]:
    """The flavours below `real`, which this machine can imitate."""
    return [flavour for flavour in ORDER[: ORDER.index(real)] if flavour in IMITATIONS]


def main(pytest_args: list[str]) -> int:
    real = cpu_flavour()
    flavours = imitable(real)
    print(f"this CPU: {real}; imitating: {', '.join(flavours) or 'nothing (no flavour below it)'}", flush=True)
    results: list[tuple[str, int, float]] = []
    for flavour in flavours:
        # torch.compile's kernel cache is not keyed by ATEN_CPU_CAPABILITY: a kernel cached under the real
        # flavour, reused under an imitated one, computed wrong results (seen: AMX CPU imitating avx2).
        cache = Path(tempfile.gettempdir()) / f"torchinductor-as-{flavour}"
        env = {**os.environ, **IMITATIONS[flavour], "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        print(
            f"\n=== the suite as {flavour} ({' '.join(f'{k}={v}' for k, v in IMITATIONS[flavour].items())})", flush=True
        )
        started = time.monotonic()
        returncode = subprocess.call([sys.executable, "-m", "pytest", *pytest_args], env=env)
        results.append((flavour, returncode, time.monotonic() - started))
    print(f"\nreal flavour {real}")
    for flavour, returncode, seconds in results:
        print(f"  as {flavour}: {'passed' if returncode == 0 else f'FAILED (exit {returncode})'} in {seconds:.0f} s")
    return max((returncode for _, returncode, _ in results), default=0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
