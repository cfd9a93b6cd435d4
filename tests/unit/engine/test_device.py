"""DEVICE and TORCH_DTYPE: auto picks what this machine runs best; explicit values are honoured or refused."""

from __future__ import annotations

import logging

import pytest
import torch

from consumer.engine import device as device_module
from consumer.engine.device import (
    attention_implementation,
    cpu_flags,
    cpu_flavour,
    cpu_has_native_bf16,
    decode_row_blocks,
    default_batch_size,
    resolve_device,
    resolve_dtype,
)
from consumer.engine.invariant import RowBlocks

# The flags lines of the three CPU flavours this project runs on (trimmed /proc/cpuinfo).
AVX2_FLAGS = "flags\t\t: fpu sse2 fma avx avx2 f16c\n"
AVX512_BF16_FLAGS = "flags\t\t: fpu sse2 fma avx avx2 avx512f avx512bw avx512vl avx512_bf16\n"
AMX_FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
FLAVOURS = {"avx2": AVX2_FLAGS, "avx512-bf16": AVX512_BF16_FLAGS, "amx": AMX_FLAGS}


@pytest.fixture
def machine(monkeypatch):
    """Pretend the machine has the given accelerators: `machine(cuda=True, mps=False)`."""

    def configure(
        cuda: bool = False,
        mps: bool = False,
        bf16_gpu: bool = True,
        bf16_cpu: bool = False,
        emulated_bf16_gpu: bool = True,
        capability: tuple[int, int] = (9, 0),
    ) -> None:
        """bf16_gpu: bfloat16 in hardware; emulated_bf16_gpu: what PyTorch says when emulation counts."""

        def is_bf16_supported(including_emulation: bool = True) -> bool:
            # torch.cuda.is_bf16_supported's own answer: emulation counts unless asked not to.
            return bf16_gpu or (including_emulation and emulated_bf16_gpu)

        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
        monkeypatch.setattr(device_module, "_mps_available", lambda: mps)
        monkeypatch.setattr(device_module, "cpu_flavour", lambda: "amx" if bf16_cpu else "avx2")

    return configure


def test_auto_device_prefers_cuda_then_mps_then_cpu(machine):
    machine(cuda=True, mps=True)
    assert resolve_device("auto") == "cuda"
    machine(cuda=False, mps=True)
    assert resolve_device("auto") == "mps"
    machine(cuda=False, mps=False)
    assert resolve_device("auto") == "cpu"


def test_auto_device_on_this_machine_is_what_torch_sees():
    expected = "cuda" if torch.cuda.is_available() else "mps" if device_module._mps_available() else "cpu"
    assert resolve_device("auto") == expected


def test_missing_device_falls_back_to_cpu_with_a_warning(machine, caplog):
    machine(cuda=False, mps=False)
    with caplog.at_level(logging.WARNING, logger="consumer.engine.device"):
        assert resolve_device("cuda") == "cpu"
        assert resolve_device("mps") == "cpu"
    assert "DEVICE=cuda requested but not available" in caplog.text
    assert "DEVICE=mps requested but not available" in caplog.text
    machine(cuda=True)
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("cpu") == "cpu"


def flags_of(tmp_path, flavour: str) -> set[str]:
    cpuinfo = tmp_path / flavour
    cpuinfo.write_text("processor\t: 0\n" + FLAVOURS[flavour] + "processor\t: 1\n" + FLAVOURS[flavour])
    return cpu_flags(cpuinfo)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_the_flavour_is_read_from_the_cpu_flags(tmp_path, flavour):
    assert cpu_flavour(flags_of(tmp_path, flavour), max_isa="") == flavour
    assert cpu_has_native_bf16(flavour) is (flavour != "avx2")


def test_no_cpuinfo_is_a_cpu_without_native_bf16(tmp_path):
    assert cpu_flags(tmp_path / "no-such-file") == set()
    assert cpu_flavour(set(), max_isa="") == "avx2"


@pytest.mark.parametrize(
    "flavour, max_isa, seen_as",
    [
        ("amx", "AVX512_CORE_AMX", "amx"),
        ("amx", "avx10_1_512_amx", "amx"),  # oneDNN's newer name for the same level, any case
        ("amx", "DEFAULT", "amx"),
        ("amx", "AVX512_CORE_BF16", "avx512-bf16"),
        ("amx", "AVX2", "avx2"),
        ("avx512-bf16", "AVX512_CORE_AMX", "avx512-bf16"),  # a cap above the CPU changes nothing
        ("avx512-bf16", "AVX512_CORE_VNNI", "avx2"),
        ("avx2", "ALL", "avx2"),
    ],
)
def test_onednn_max_cpu_isa_caps_the_flavour(tmp_path, flavour, max_isa, seen_as):
    """oneDNN runs bfloat16 matmuls: capped below the CPU's bfloat16 instructions, bfloat16 is emulated."""
    assert cpu_flavour(flags_of(tmp_path, flavour), max_isa=max_isa) == seen_as


@pytest.mark.parametrize(
    "flavour, expected", [("avx2", torch.float32), ("avx512-bf16", torch.bfloat16), ("amx", torch.bfloat16)]
)
def test_auto_dtype_on_each_cpu_flavour(flavour, expected):
    # bfloat16 only where the hardware multiplies it; emulated bf16 and fp16 are slower than fp32.
    assert resolve_dtype("auto", "cpu", flavour=flavour) == expected


def test_auto_dtype_per_device(machine):
    machine(cuda=True, bf16_gpu=True, bf16_cpu=False)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    machine(cuda=True, bf16_gpu=False, emulated_bf16_gpu=False)
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "mps") == torch.float16
    machine(bf16_cpu=True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    machine(bf16_cpu=False)
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_explicit_dtype_is_honoured_with_a_warning_where_slow(machine, caplog):
    machine(cuda=True, bf16_cpu=False)
    with caplog.at_level(logging.WARNING, logger="consumer.engine.device"):
        assert resolve_dtype("float16", "cpu") == torch.float16
        assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
        assert resolve_dtype("float32", "cpu") == torch.float32
    assert "float16 on cpu is emulated and slow" in caplog.text
    assert "bfloat16 on a cpu without native bf16" in caplog.text
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_dtype("float16", "cuda") == torch.float16


def test_bfloat16_on_a_gpu_without_it_is_refused(machine):
    machine(cuda=True, bf16_gpu=False, emulated_bf16_gpu=False)
    with pytest.raises(ValueError, match="no bfloat16 units .* use float16 or auto"):
        resolve_dtype("bfloat16", "cuda")


def test_a_gpu_that_only_emulates_bfloat16_counts_as_without_it(machine):
    """A T4 or V100 (compute capability 7.x): PyTorch emulates bfloat16 there, and calls it supported."""
    machine(cuda=True, bf16_gpu=False, emulated_bf16_gpu=True, capability=(7, 5))
    assert torch.cuda.is_bf16_supported()  # what the check used to ask, faked as such a GPU answers
    assert resolve_dtype("auto", "cuda") == torch.float16
    with pytest.raises(ValueError, match="no bfloat16 units"):
        resolve_dtype("bfloat16", "cuda")
    machine(cuda=True, bf16_gpu=True, capability=(8, 0))
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cuda") == torch.bfloat16


@pytest.mark.parametrize(
    "device, dtype, flash_available, capability, expected",
    [
        ("cuda", torch.bfloat16, True, (8, 0), "flash_attention_2"),
        ("cuda", torch.float16, True, (9, 0), "flash_attention_2"),
        ("cuda", torch.float16, True, (7, 5), "sdpa"),  # FlashAttention 2 needs Ampere or newer
        ("cuda", torch.float32, True, (9, 0), "sdpa"),  # and float16 or bfloat16
        ("cuda", torch.bfloat16, False, (9, 0), "sdpa"),  # and a flash-attn transformers accepts
        ("cpu", torch.bfloat16, True, (9, 0), "sdpa"),
    ],
)
def test_flash_attention_only_where_it_runs(machine, monkeypatch, device, dtype, flash_available, capability, expected):
    import transformers.utils

    machine(cuda=True, capability=capability)
    # transformers' own check: the flash-attn distribution, its version (>= 2.3.3), a CUDA PyTorch.
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: flash_available)
    assert attention_implementation(device, dtype) == expected


def test_an_importable_but_unusable_flash_attn_is_not_chosen(machine, monkeypatch):
    """`import flash_attn` working is not enough (the old check): an old or foreign build is refused."""
    import sys
    import types

    import transformers.utils

    machine(cuda=True, capability=(9, 0))
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert attention_implementation("cuda", torch.bfloat16) == "sdpa"


@pytest.mark.parametrize(
    "device, dtype, flavour, onednn, expected",
    [
        ("cpu", torch.float32, "avx2", True, RowBlocks(2, 256, "onednn")),
        ("cpu", torch.float32, "amx", False, RowBlocks(16, 16)),  # DECODE_MATMUL=default
        ("cpu", torch.bfloat16, "amx", True, RowBlocks(16, 16, "packed")),
        ("cpu", torch.bfloat16, "avx512-bf16", True, RowBlocks(8, 8, "packed")),
        ("cpu", torch.bfloat16, "avx2", True, RowBlocks(16, 16)),  # oneDNN cannot pack emulated bfloat16
        ("cpu", torch.bfloat16, "amx", False, RowBlocks(16, 16)),
        ("cuda", torch.bfloat16, None, False, RowBlocks(64, 64)),
    ],
)
def test_decode_row_blocks_per_device_dtype_and_flavour(device, dtype, flavour, onednn, expected):
    assert decode_row_blocks(device, dtype, flavour, onednn=onednn) == expected


def test_decode_rows_fixes_the_row_count_anywhere():
    assert decode_row_blocks("cpu", torch.float32, "avx2", onednn=True, rows=8) == RowBlocks(8, 8, "onednn")
    assert decode_row_blocks("cpu", torch.bfloat16, "amx", onednn=True, rows=8) == RowBlocks(8, 8, "packed")
    assert decode_row_blocks("cuda", torch.bfloat16, None, rows=32) == RowBlocks(32, 32)
    # Emulated bfloat16: oneDNN has no bfloat16 kernel there, so the fixed count runs on PyTorch's.
    assert decode_row_blocks("cpu", torch.bfloat16, "avx2", onednn=True, rows=3) == RowBlocks(3, 3, "default")


@pytest.mark.parametrize(
    "device, flavour, dtype, expected",
    [("cpu", "avx2", torch.float32, 16), ("cpu", "amx", torch.bfloat16, 16), ("cpu", "amx", torch.float32, 16)],
)
def test_default_batch_size_per_flavour(device, flavour, dtype, expected):
    assert default_batch_size(device, flavour, dtype) == expected
    assert default_batch_size("cuda") == 8


def test_refused_dtype_stops_the_engine_load(machine, tiny_model):
    from consumer.engine.base import EngineLoadError
    from consumer.engine.qwen import QwenVLEngine
    from consumer.settings import Settings

    machine(cuda=True, bf16_gpu=False, capability=(7, 0))
    settings = Settings.from_environ({}, base_model_id=str(tiny_model), device="cuda", torch_dtype="bfloat16")
    with pytest.raises(EngineLoadError, match="no bfloat16 units"):
        QwenVLEngine(settings).load()
