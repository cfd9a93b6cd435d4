"""What identifies a result: the image's bytes, the prompt, the model, the adapter, the generation
settings and the dtype, hashed into one result key.

Two events with the same key get the same description (up to the model's own nondeterminism across
batch compositions), so the second one can be answered from the cache. What is NOT in the key, on
purpose: the event's id, key, metadata and source; the device (cuda and cpu give the same answer in
the same dtype, within rounding); the batch size; the image's reference (a URL and inline base64 of
the same bytes are one image).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from consumer.engine.base import EngineInfo
from consumer.settings import Settings

KEY_VERSION = 1
"""Bumped when what goes into a key changes: every entry written before then becomes unreachable."""
MODEL_CONFIG = "config.json"
MODEL_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def content_hash(data: bytes) -> str:
    """sha256 of an image's bytes, as fetched (before decoding), in hex: `metadata.content_hash`."""
    return hashlib.sha256(data).hexdigest()


def model_fingerprint(model: str) -> str | None:
    """For a model in a local directory: sha256 over its config.json, its weight index files, and
    the names and sizes of its weight files (their bytes are not read: gigabytes). None for a hub id
    (the id names it) or a directory without config.json."""
    directory = Path(model)
    config = directory / MODEL_CONFIG
    if not config.is_file():
        return None
    digest = hashlib.sha256(b"model-v1\0")
    digest.update(config.read_bytes())
    for file in sorted(directory.iterdir(), key=lambda child: child.name):
        if not file.is_file() or not file.name.endswith(MODEL_WEIGHT_SUFFIXES):
            continue
        digest.update(b"\0" + file.name.encode() + b"\0" + str(file.stat().st_size).encode())
        if file.name.endswith(".index.json"):
            digest.update(b"\0" + file.read_bytes())
    return digest.hexdigest()


class _Keyed:
    """The keyer's own adapter (a marker: None means no adapter)."""


_KEYED = _Keyed()


@dataclass(frozen=True)
class ResultKeyer:
    """Everything in a result key but the image and the prompt: fixed for a running replica."""

    model: str
    """The model id as results report it (BASE_MODEL_ID: a hub id or a local directory)."""
    model_fingerprint: str | None
    adapter: str | None
    """The adapter's content hash (consumer/engine/adapter_hash.py), None without an adapter."""
    max_new_tokens: int
    image_min_pixels: int
    image_max_pixels: int
    dtype: str
    unmerged: bool = False
    """ADAPTERS set: adapters run unmerged (x W + x A B instead of x (W + A B)), which can round to another
    text than the same adapter merged, so such results get keys of their own."""

    @classmethod
    def for_engine(cls, settings: Settings, info: EngineInfo) -> ResultKeyer:
        """The keyer of a loaded engine, keyed on its adapter's content as the engine hashed it when loading."""
        return cls(
            model=info.model,
            model_fingerprint=model_fingerprint(info.model),
            adapter=info.adapter_hash,
            max_new_tokens=settings.max_new_tokens,
            image_min_pixels=settings.image_min_pixels,
            image_max_pixels=settings.image_max_pixels,
            dtype=info.dtype,
            unmerged=bool(settings.adapters),
        )

    def key(self, image_hash: str, prompt: str, adapter: str | None | _Keyed = _KEYED) -> str:
        """The result key (sha256, hex) of an image, by its `content_hash`, described with `prompt`, by the
        adapter whose content hash is `adapter` (default: the keyer's own, ADAPTER_PATH's at start)."""
        document = {
            "v": KEY_VERSION,
            "image": image_hash,
            "prompt": prompt,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "adapter": self.adapter if isinstance(adapter, _Keyed) else adapter,
            "max_new_tokens": self.max_new_tokens,
            "image_pixels": [self.image_min_pixels, self.image_max_pixels],
            "dtype": self.dtype,
        }
        if self.unmerged:
            document["lora"] = "unmerged"  # only then: keys without ADAPTERS stay as they were
        text = json.dumps(document, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
