"""Which LoRA adapters a replica serves, by name, and which version of each ran.

ADAPTER_PATH is the adapter named `default`; ADAPTERS (`name=path,...`) names further ones on the same
base model. An event picks one with its `adapter` field (absent: `default`). A name's directory may
be replaced while the replica runs (consumer/engine/reload.py), so what ran for an event is a version:
the name, the path results report as `metadata.adapter`, and the content hash (adapter_hash.py) that
the result cache keys on and results report as `metadata.adapter_hash`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADAPTER = "default"
"""The name of the adapter at ADAPTER_PATH, and of what an event without `adapter` runs on."""
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""An adapter name: letters, digits, `_` and `-`, at most 64 characters (a module name of the model:
no dots)."""


@dataclass(frozen=True)
class AdapterVersion:
    """The adapter one generation ran with."""

    name: str
    path: str | None
    """The adapter's directory (`metadata.adapter`); None when the base model ran alone."""
    hash: str | None
    """sha256 over its config and weight files (consumer/engine/adapter_hash.py); None without an adapter."""


def parse_adapters(text: str) -> tuple[tuple[str, Path], ...]:
    """ADAPTERS as (name, path) pairs: `bpmn=/models/bpmn,uml=/models/uml`; blank parts are skipped.

    Raises ValueError for a part without `=`, an invalid or repeated name, or the reserved `default`
    (ADAPTER_PATH is that one)."""
    pairs: list[tuple[str, Path]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        name, separator, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not separator or not path:
            raise ValueError(f"each adapter is name=path, got {part.strip()!r}")
        pairs.append((name, Path(path)))
    return check_adapter_names(tuple(pairs))


def check_adapter_names(pairs: tuple[tuple[str, Path], ...]) -> tuple[tuple[str, Path], ...]:
    seen: set[str] = set()
    for name, _ in pairs:
        if name == DEFAULT_ADAPTER:
            raise ValueError(f"{DEFAULT_ADAPTER!r} is the adapter at ADAPTER_PATH; give the others other names")
        if not ADAPTER_NAME.match(name):
            raise ValueError(f"adapter name {name!r}: letters, digits, '_' and '-' only, at most 64 characters")
        if name in seen:
            raise ValueError(f"adapter {name!r} is named twice")
        seen.add(name)
    return pairs
