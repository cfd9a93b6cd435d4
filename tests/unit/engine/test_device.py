"""DEVICE and TORCH_DTYPE: auto picks what this machine runs best; explicit values are honoured or refused."""

from __future__ import annotations

import logging

import pytest
import torch

from consumer.engine import device as device_module
from consumer.engine.device import cpu_flags, cpu_flavour, cpu_has_native_bf16, resolve_device, resolve_dtype

# The flags lines of the three CPU flavours this project runs on (trimmed /proc/cpuinfo).
AVX2_FLAGS = "flags\t\t: fpu sse2 fma avx avx2 f16c\n"
AVX512_BF16_FLAGS = "flags\t\t: fpu sse2 fma avx avx2 avx512f avx512bw avx512vl avx512_bf16\n"
AMX_FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
FLAVOURS = {"avx2": AVX2_FLAGS, "avx512-bf16": AVX512_BF16_FLAGS, "amx": AMX_FLAGS}


@pytest.fixture
def machine(monkeypatch):
    """Pretend the machine has the given accelerators: `machine(cuda=True, mps=False)`."""

    def configure(cuda: bool = False, mps: bool = False, bf16_gpu: bool = True, bf16_cpu: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_gpu)
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
    machine(cuda=True, bf16_gpu=False)
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
    machine(cuda=True, bf16_gpu=False)
    with pytest.raises(ValueError, match="no bfloat16 support; use float16 or auto"):
        resolve_dtype("bfloat16", "cuda")


def test_refused_dtype_stops_the_engine_load(machine, tiny_model):
    from consumer.engine.base import EngineLoadError
    from consumer.engine.qwen import QwenVLEngine
    from consumer.settings import Settings

    machine(cuda=True, bf16_gpu=False)
    settings = Settings.from_environ({}, base_model_id=str(tiny_model), device="cuda", torch_dtype="bfloat16")
    with pytest.raises(EngineLoadError, match="no bfloat16 support"):
        QwenVLEngine(settings).load()
