"""LoRA adapters on the base model: checked when loaded, and with ADAPTERS several of them, unmerged.

With one adapter the engine merges it into the weights (consumer/engine/qwen.py): no cost per token.
With ADAPTERS (`AdapterSet`) every adapter is loaded into one PeftModel and stays unmerged, and each
model call runs on one of them (`activated`): the LoRA product is computed beside every targeted
layer, for every token. Peft's mixed-adapter batches (`adapter_names`) would save the split, but the
invariant decoder calls the layers itself, so the engine splits a mixed batch by adapter instead, and an
image's text is the same in either (the batch-invariance rule: consumer/engine/invariant.py).

`AdapterSet.replace` loads new content for a name under a new internal name, checks it, and only then
drops the old one: a reload that fails leaves the old adapter as it was.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from consumer.engine.adapter_hash import adapter_hash
from consumer.engine.adapters import DEFAULT_ADAPTER, AdapterVersion
from consumer.engine.base import EngineLoadError

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json",)


def adapter_present(adapter_path: Path) -> bool:
    return all((adapter_path / name).is_file() for name in ADAPTER_FILES)


def check_adapter_keys(peft_model: Any, adapter_path: Path, adapter_name: str = "default") -> None:
    """Refuse an adapter whose weights do not land on the model (peft only warns, then does nothing)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    weights = adapter_path / "adapter_model.safetensors"
    if not weights.is_file():
        raise EngineLoadError(f"adapter at {adapter_path} has no adapter_model.safetensors")
    with safe_open(str(weights), framework="pt") as handle:
        saved = set(handle.keys())
    expected = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name).keys())
    missing, unexpected = expected - saved, saved - expected
    if missing or unexpected:
        raise EngineLoadError(
            f"adapter at {adapter_path} does not fit {peft_model.base_model.model.__class__.__name__}: "
            f"{len(missing)} weights the model expects are missing from it (e.g. {sorted(missing)[:2]}) and "
            f"{len(unexpected)} of its weights match no module of the model (e.g. {sorted(unexpected)[:2]}); "
            "it was probably trained against another model, layer count or module layout"
        )


class AdapterSet:
    """Every adapter of ADAPTERS (and ADAPTER_PATH as `default`) in one PeftModel, unmerged.

    Not thread-safe: the engine calls `activated` and `replace` under its model lock.
    """

    def __init__(self, paths: Mapping[str, Path]) -> None:
        self.paths = dict(paths)
        self.model: Any = None
        """The PeftModel, once `attach` has run."""
        self.versions: dict[str, AdapterVersion] = {}
        self._internal: dict[str, str | None] = {}
        """Name -> the PeftModel's name for its current content; None: the base model alone (`default`
        where ADAPTER_PATH holds no adapter)."""
        self._loads = 0

    def attach(self, base_model: Any) -> Any:
        """Load every adapter onto `base_model`; the PeftModel. Raises EngineLoadError naming the adapter."""
        for name, path in self.paths.items():
            if adapter_present(path):
                self.versions[name] = self._load(name, path, base_model)
            elif name == DEFAULT_ADAPTER:
                logger.warning("no LoRA adapter at %s: `default` runs the base model alone (adapter: null)", path)
                self.versions[name] = AdapterVersion(name, None, None)
                self._internal[name] = None
            else:
                raise EngineLoadError(f"ADAPTERS: no LoRA adapter (adapter_config.json) at {path} for {name!r}")
        logger.info("adapters loaded, unmerged: %s", ", ".join(f"{n}={p}" for n, p in self.paths.items()))
        return self.model

    def _load(self, name: str, path: Path, base_model: Any) -> AdapterVersion:
        """Load `path` under a new internal name and check it; the new version (not yet in use)."""
        from peft import PeftModel

        content = adapter_hash(path)
        self._loads += 1
        internal = f"{name}-{self._loads}"
        logger.info("loading LoRA adapter %r from %s", name, path)
        try:
            if self.model is None:
                self.model = PeftModel.from_pretrained(base_model, str(path), adapter_name=internal)
            else:
                self.model.load_adapter(str(path), adapter_name=internal)
        except Exception as exc:
            self._forget(internal)
            raise EngineLoadError(f"cannot load LoRA adapter {name!r} at {path}: {exc}") from exc
        try:
            check_adapter_keys(self.model, path, internal)
            if adapter_hash(path) != content:
                raise EngineLoadError(f"adapter {name!r} at {path} changed while it was being read")
        except EngineLoadError:
            self._forget(internal)
            raise
        self._internal[name] = internal
        return AdapterVersion(name, str(path), content)

    def _forget(self, internal: str) -> None:
        if self.model is not None and internal in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter(internal)

    def replace(self, name: str) -> AdapterVersion:
        """Load `name`'s directory again and use it from the next `activated` on; raises EngineLoadError
        (the old content stays in use) when it holds no adapter or one that cannot be loaded."""
        path = self.paths[name]
        if not adapter_present(path):
            raise EngineLoadError(f"no LoRA adapter (adapter_config.json) at {path} any more")
        old = self._internal.get(name)
        version = self._load(name, path, None)
        if old is not None:
            self.model.set_adapter(self._internal[name])  # never delete the active one (peft warns, picks another)
            self.model.delete_adapter(old)
        self.versions[name] = version
        return version

    @contextmanager
    def activated(self, name: str) -> Iterator[AdapterVersion]:
        """Run the model on adapter `name` inside the block; its version."""
        internal = self._internal[name]
        if internal is None:
            with self.model.disable_adapter():
                yield self.versions[name]
            return
        self.model.set_adapter(internal)
        yield self.versions[name]
