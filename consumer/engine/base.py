"""The model behind a small interface: load, warm up, prepare an image, generate a batch.

The pipeline only sees `Engine`; a different backend (vLLM on GPUs, say) is another class with the
same four methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

from PIL import Image

from consumer.engine.adapters import DEFAULT_ADAPTER, AdapterVersion

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ImageFeatures:
    """One image as the vision encoder takes it: its patches and their (t, h, w) grid."""

    pixel_values: torch.Tensor
    """(patches, channels x temporal_patch x patch x patch), float32."""
    image_grid_thw: torch.Tensor
    """(1, 3): the patch grid; visual tokens = t * h * w / merge_size**2."""


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
    prepared: ImageFeatures | None = None
    adapter: str = DEFAULT_ADAPTER
    """The name of the LoRA adapter to run (consumer/engine/adapters.py)."""


@dataclass(frozen=True)
class Generation:
    """What the model said about one image."""

    text: str
    output_tokens: int
    adapter: AdapterVersion | None = None
    """The adapter it ran with; None from an engine without adapters (ENGINE=echo)."""


@dataclass(frozen=True)
class GenerationBatch:
    """What one `generate` call returned, in request order, and what it cost."""

    generations: list[Generation]
    seconds: float
    """The whole call."""
    preprocess_seconds: float = 0.0
    """The part spent turning images and prompts into tensors (included in `seconds`)."""


@dataclass(frozen=True)
class EngineInfo:
    """What /health, the metrics and every result's metadata report about the loaded model."""

    model: str
    adapter: str | None
    device: str
    dtype: str
    backend: str
    model_load_time: float
    default_batch_size: int
    """The batch this engine runs best at on its device; BATCH_SIZE, when set, overrides it."""
    adapter_names: tuple[str, ...] = (DEFAULT_ADAPTER,)
    """The adapters an event may name: `default` (ADAPTER_PATH), then those of ADAPTERS."""
    adapter_hash: str | None = None
    """The content hash (consumer/engine/adapter_hash.py) of `adapter` as it was loaded; None without one."""


class Generator(Protocol):
    """What the pipeline runs images through: a loaded engine, or the engine shared with POST /infer."""

    def prepare_image(self, image: Image.Image) -> ImageFeatures | None:
        """The per-image part of `generate` (resize, normalise, patchify), run ahead on any thread.

        Thread-safe. None when this engine has no such step (`generate` then takes the image itself);
        raises for an image the model cannot take, which the pipeline dead-letters at the `prepare` stage.
        """

    def generate(self, requests: Sequence[GenerationRequest]) -> GenerationBatch:
        """Describe every image in one batch; results come back in request order."""


class Engine(Generator, Protocol):
    def load(self) -> EngineInfo:
        """Load weights and processor; raise `EngineLoadError` with the cause if that fails."""

    def warm_up(self) -> float:
        """Run one generation so the first real batch does not pay for lazy initialisation; its seconds."""


@runtime_checkable
class ServesAdapters(Protocol):
    """An engine that serves named LoRA adapters and can load one again while it runs."""

    def adapter_version(self, name: str) -> AdapterVersion:
        """The version adapter `name` runs on now (KeyError for a name it does not serve); any thread."""

    def reload_adapter(self, name: str) -> AdapterVersion:
        """Load adapter `name` from its directory again; model calls after this returns use it. Raises
        `EngineLoadError` with the cause, the old adapter still in use, when it cannot."""


class EngineLoadError(RuntimeError):
    """The model or its adapter cannot be loaded: the service must not start."""
