"""adapter_hash: one hash per adapter content, whatever its path; None without an adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

from consumer.engine.adapter_hash import adapter_hash


def make_adapter(directory: Path, weights: bytes = b"\x00\x01" * 100, config: str = '{"r": 8}') -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(config)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def test_no_adapter_is_none(tmp_path):
    assert adapter_hash(None) is None
    assert adapter_hash(tmp_path / "missing") is None
    assert adapter_hash(tmp_path) is None  # a directory without adapter_config.json: the base model alone


def test_the_same_adapter_at_another_path_hashes_the_same(tmp_path):
    first = make_adapter(tmp_path / "a")
    second = tmp_path / "mounted" / "weights"
    shutil.copytree(first, second)
    assert adapter_hash(first) == adapter_hash(str(second))
    assert len(adapter_hash(first) or "") == 64


def test_what_changes_the_hash_and_what_does_not(tmp_path):
    base = adapter_hash(make_adapter(tmp_path / "base"))
    assert adapter_hash(make_adapter(tmp_path / "config", config='{"r": 16}')) != base
    assert adapter_hash(make_adapter(tmp_path / "weights", weights=b"\x00\x02" * 100)) != base
    extra = make_adapter(tmp_path / "extra-weights")
    (extra / "adapter_model_2.bin").write_bytes(b"more")
    assert adapter_hash(extra) != base
    renamed = make_adapter(tmp_path / "renamed")
    (renamed / "adapter_model.safetensors").rename(renamed / "other.safetensors")
    assert adapter_hash(renamed) != base
    # Files that are not the adapter's config or weights leave it as it is.
    documented = make_adapter(tmp_path / "documented")
    (documented / "README.md").write_text("trained on ...")
    (documented / "tokenizer.json").write_text("{}")
    assert adapter_hash(documented) == base
