"""ENGINE=echo: a model-free engine that answers a fixed description, for measuring the pipeline.

It exists so bench/ can find the ceiling of everything around the model (Kafka, JSON, image fetch
and decode). The service refuses it unless ENGINE=echo is set explicitly. ECHO_DELAY_MS makes each
generate call sleep, so the delivery tests can stand in for a model slower than max.poll.interval.ms.
"""

from __future__ import annotations

import time
from typing import Sequence

from consumer.engine.base import EngineInfo, Generation, GenerationRequest

ECHO_DESCRIPTION = "| # | Step | Role |\n|---|---|---|\n| 1 | echo engine: no model was run | - |"


class EchoEngine:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.info = EngineInfo(model="echo", device="cpu", dtype="none", backend="echo")
        self.last_preprocess_seconds = 0.0
        self.delay_s = delay_s

    def load(self) -> None:
        self.info.model_load_time = 0.0
        self.info.model_loaded = self.info.processor_loaded = True

    def warm_up(self) -> None:
        self.info.warmup_time = 0.0

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if self.delay_s:
            time.sleep(self.delay_s)  # one sleep per batch, like one forward pass per batch
        return [Generation(text=ECHO_DESCRIPTION, output_tokens=0) for _ in requests]
