"""ENGINE=echo: a model-free engine that answers a fixed description, for measuring the pipeline.

It exists so bench/ can find the ceiling of everything around the model (Kafka, JSON, image fetch
and decode). It runs only when ENGINE=echo is set (the default is transformers), never where a
LoRA adapter is mounted (settings validation), and it says so: a warning at start-up, another every
REMINDER_INTERVAL_S while it answers, and "echo" as the model in /health and in every result.
ECHO_DELAY_MS makes each generate call sleep, so the delivery tests can stand in for a model slower
than max.poll.interval.ms.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

from PIL import Image

from consumer.engine.base import EngineInfo, Generation, GenerationBatch, GenerationRequest

logger = logging.getLogger(__name__)

ECHO_DESCRIPTION = "| # | Step | Role |\n|---|---|---|\n| 1 | echo engine: no model was run | - |"
REMINDER_INTERVAL_S = 60.0


class EchoEngine:
    def __init__(self, delay_s: float = 0.0, reminder_interval_s: float = REMINDER_INTERVAL_S) -> None:
        self.delay_s = delay_s
        self.answered = 0
        self._reminder_interval_s = reminder_interval_s
        self._last_reminder = time.monotonic()

    def load(self) -> EngineInfo:
        return EngineInfo(
            model="echo",
            adapter=None,
            device="cpu",
            dtype="none",
            backend="echo",
            model_load_time=0.0,
            default_batch_size=8,
        )

    def warm_up(self) -> float:
        return 0.0

    def prepare_image(self, image: Image.Image) -> None:
        return None

    def generate(self, requests: Sequence[GenerationRequest]) -> GenerationBatch:
        started = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)  # one sleep per batch, like one forward pass per batch
        self.answered += len(requests)
        if time.monotonic() - self._last_reminder >= self._reminder_interval_s:
            self._last_reminder = time.monotonic()
            logger.warning(
                "ENGINE=echo: %d events answered so far with a fixed text, no model ran (benchmarks only)",
                self.answered,
            )
        generations = [Generation(text=ECHO_DESCRIPTION, output_tokens=0) for _ in requests]
        return GenerationBatch(generations, time.perf_counter() - started)
