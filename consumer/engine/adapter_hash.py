"""What a LoRA adapter is, by content: one hash over its configuration and its weights.

The one definition for everything that must tell two adapters apart whatever their path (the result
cache's key, consumer/result_cache/key.py; the adapters' own bookkeeping): two directories with the
same `adapter_config.json` and the same weight files hash the same, and a retrained adapter mounted
at the same path hashes differently.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Files that hold an adapter's weights (peft writes adapter_model.safetensors, formerly .bin)."""
_CHUNK = 1 << 20


def adapter_files(path: Path) -> list[Path]:
    """The files that define the adapter in `path`: its config and its weight files, by name; empty
    when `path` holds no adapter_config.json (no adapter: the base model runs alone)."""
    config = path / ADAPTER_CONFIG
    if not config.is_file():
        return []
    weights = sorted(
        (child for child in path.iterdir() if child.is_file() and child.name.endswith(WEIGHT_SUFFIXES)),
        key=lambda child: child.name,
    )
    return [config, *weights]


def adapter_hash(path: Path | str | None) -> str | None:
    """sha256 (hex) over the adapter's config and weight files, each as its name, its size and its
    bytes, in name order; None when there is no adapter at `path`. Other files (a tokenizer, a README)
    do not change it. Reads every weight file once: call it once at start."""
    if path is None:
        return None
    files = adapter_files(Path(path))
    if not files:
        return None
    digest = hashlib.sha256(b"adapter-v1\0")
    for file in files:
        digest.update(file.name.encode() + b"\0" + str(file.stat().st_size).encode() + b"\0")
        with file.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
