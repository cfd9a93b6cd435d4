"""ENGINE=echo, the model-free engine for pipeline benchmarks: it runs only when named, never where a
model is mounted, and it says so in the logs and in every result."""

import logging

import pytest
from PIL import Image
from pydantic import ValidationError

from consumer.engine.base import GenerationRequest
from consumer.engine.echo import EchoEngine
from consumer.service import build_engine
from consumer.settings import Settings


def test_the_model_runs_unless_echo_is_named_exactly():
    assert Settings.from_environ({}).engine == "transformers"
    assert Settings.from_environ({"ENGINE": "echo"}).engine == "echo"
    for near_miss in ("ECHO", "Echo", "echo ", "mock"):
        with pytest.raises(ValidationError, match="engine"):
            Settings.from_environ({"ENGINE": near_miss})


def test_echo_is_refused_where_a_lora_adapter_is_mounted(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValidationError, match=f"ENGINE=echo .* ADAPTER_PATH={tmp_path}"):
        Settings.from_environ({"ENGINE": "echo", "ADAPTER_PATH": str(tmp_path)})
    # The same mount without ENGINE is an ordinary model deployment.
    assert Settings.from_environ({"ADAPTER_PATH": str(tmp_path)}).engine == "transformers"


def test_echo_warns_at_start_up_and_keeps_reminding(caplog, tmp_path):
    caplog.set_level(logging.WARNING)
    engine = build_engine(Settings.from_environ({"ENGINE": "echo", "ADAPTER_PATH": str(tmp_path / "none")}))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "NO MODEL RUNS" in caplog.text and "Qwen/Qwen3-VL-2B-Instruct" in caplog.text
    info = engine.load()
    assert info.model == "echo" and info.backend == "echo"  # what /health and results show

    caplog.clear()
    reminding = EchoEngine(reminder_interval_s=0)
    request = GenerationRequest(image=Image.new("RGB", (32, 32)), prompt="describe")
    for _ in range(2):
        generations = reminding.generate([request, request]).generations
    assert [r.getMessage() for r in caplog.records] == [
        "ENGINE=echo: 2 events answered so far with a fixed text, no model ran (benchmarks only)",
        "ENGINE=echo: 4 events answered so far with a fixed text, no model ran (benchmarks only)",
    ]
    assert all("no model was run" in generation.text for generation in generations)
