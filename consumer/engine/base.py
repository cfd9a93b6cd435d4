"""The model behind a small interface: load, warm up, generate a batch.

The pipeline only sees `Engine`; a different backend (vLLM on GPUs, say) is another class with the
same three methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from PIL import Image


@dataclass(frozen=True)
class GenerationRequest:
    """One image and the instruction to apply to it.

    `prepared` is what the engine's `prepare_image` returned for this image, when the caller ran it
    ahead of time (the pipeline does, on its fetch threads); `generate` prepares the image itself
    when it is None. Either way the output is the same.
    """

    image: Image.Image | None
    """None only when `prepared` is set (the pipeline lets decoded pixels go once prepared)."""
    prompt: str
    prepared: object | None = None


@dataclass(frozen=True)
class Generation:
    """What the model said about one image."""

    text: str
    output_tokens: int


@dataclass
class EngineInfo:
    """What /health, the metrics and every result's metadata report about the loaded model."""

    model: str
    adapter: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "transformers"
    model_load_time: float | None = None
    warmup_time: float | None = None
    default_batch_size: int = 8
    """The batch this engine runs best at on its device; BATCH_SIZE, when set, overrides it."""
    model_loaded: bool = False
    processor_loaded: bool = False
    notes: list[str] = field(default_factory=list)


class Engine(Protocol):
    info: EngineInfo
    last_preprocess_seconds: float
    """Time the last `generate` spent turning images and prompts into tensors (part of its total)."""

    def load(self) -> None:
        """Load weights and processor; raise `EngineLoadError` with the cause if that fails."""

    def warm_up(self) -> None:
        """Run one generation so the first real batch does not pay for lazy initialisation."""

    def prepare_image(self, image: Image.Image) -> object | None:
        """The per-image part of `generate` (resize, normalise, patchify), run ahead on any thread.

        Thread-safe. Returns an opaque value for `GenerationRequest.prepared`, or None when this
        engine has no such step or it failed (then `generate` does it and reports any error).
        """

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Describe every image in one batch; results come back in request order."""


class EngineLoadError(RuntimeError):
    """The model or its adapter cannot be loaded: the service must not start."""
