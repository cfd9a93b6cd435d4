"""ENGINE=echo: a model-free engine that answers a fixed description, for measuring the pipeline.

It exists so bench/ can find the ceiling of everything around the model (Kafka, JSON, image fetch
and decode). The service refuses it unless ENGINE=echo is set explicitly.
"""

from __future__ import annotations

from typing import Sequence

from consumer.engine.base import EngineInfo, Generation, GenerationRequest

ECHO_DESCRIPTION = "| # | Step | Role |\n|---|---|---|\n| 1 | echo engine: no model was run | - |"


class EchoEngine:
    def __init__(self) -> None:
        self.info = EngineInfo(model="echo", device="cpu", dtype="none", backend="echo")
        self.last_preprocess_seconds = 0.0

    def load(self) -> None:
        self.info.model_load_time = 0.0
        self.info.model_loaded = self.info.processor_loaded = True

    def warm_up(self) -> None:
        self.info.warmup_time = 0.0

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return [Generation(text=ECHO_DESCRIPTION, output_tokens=0) for _ in requests]
