"""What the side server reports about this replica: written by the service and the pipeline, read by
the side server's thread (plain attribute reads and writes, each atomic in CPython)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from consumer.engine.base import EngineInfo
from consumer.engine.shared import SharedEngine


@dataclass
class ServiceState:
    model: str
    """BASE_MODEL_ID: what /health names while the model is still loading."""
    started_at: float = field(default_factory=time.time)
    engine: EngineInfo | None = None
    """The loaded model; None while it loads."""
    warmup_time: float | None = None
    """Seconds of the warm-up generation; None until it ran."""
    shared_engine: SharedEngine | None = None
    """POST /infer's way to the model, once it is warm."""
    ready: bool = False
    """The model is warm and the pipeline is running."""
    in_group: bool = False
    broker_ok: bool = True
    last_poll: float = 0.0
    assigned: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    """Partitions paused because the in-flight window is full."""
    waiting: list[str] = field(default_factory=list)
    """Retry-topic partitions paused until their next record is due."""
    stopping: bool = False

    def is_ready(self) -> bool:
        """Readiness: the model is loaded and warm and the consumer is in its group (which needs a
        reachable broker); a member that is shutting down is no longer ready."""
        warm = self.engine is not None and self.warmup_time is not None and self.ready
        return warm and self.in_group and self.broker_ok and not self.stopping

    def poll_age(self, now: float | None = None) -> float | None:
        """Seconds since the poll loop last came round; None before it first ran."""
        if not self.last_poll:
            return None
        return (now or time.time()) - self.last_poll
