"""IMAGE_ROOT paths opened beneath the root at every component, with openat2 and with the walk.

The race: a reference is checked (resolved, found under the root), then a directory on its way is
swapped for a symlink to somewhere else before the file is opened. O_NOFOLLOW on the last component
alone would follow the swapped directory; both openers here must refuse it. The swap happens at
exactly that moment through the reader's `after_check` seam, so the race is deterministic.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from consumer.errors import FetchError
from consumer.images import ImageResolver
from consumer.settings import Settings

INSIDE = b"the image under the root"
OUTSIDE = b"a file outside the root that must never be read"


def openers() -> list:
    from consumer.images import local

    return [
        pytest.param(
            local.openat2_beneath,
            id="openat2",
            marks=pytest.mark.skipif(not local.openat2_available(), reason="this kernel has no openat2"),
        ),
        pytest.param(local.walk_beneath, id="walk"),
    ]


def opener_params() -> list:
    try:
        return openers()
    except (ImportError, AttributeError):  # older code: one opener, the resolver's own
        return [pytest.param(None, id="default")]


@pytest.fixture(params=opener_params())
def reader(request, tmp_path):
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(INSIDE)
    (root / "sub" / "deeper" / "ok.png").write_bytes(INSIDE)
    (root / "inside-link.png").symlink_to("sub/ok.png")
    (root / "inside-dir-link").symlink_to(root / "sub")
    (tmp_path / "outside" / "deeper").mkdir(parents=True)
    (tmp_path / "outside" / "ok.png").write_bytes(OUTSIDE)
    (tmp_path / "outside" / "deeper" / "ok.png").write_bytes(OUTSIDE)
    resolver = ImageResolver(Settings(image_root=root))
    if request.param is not None:
        resolver.path_reader.open_beneath = request.param
    return resolver, root, tmp_path / "outside"


def swap_for_symlink(directory: Path, target: Path):
    """An `after_check` hook: replace `directory` by a symlink to `target` (once)."""

    def hook(_checked: Path) -> None:
        if not directory.is_symlink():
            directory.rename(directory.with_name(directory.name + "-moved"))
            directory.symlink_to(target)

    return hook


def read_or_refuse(resolver: ImageResolver, reference: str) -> bytes | FetchError:
    try:
        return resolver.read_path(reference)
    except FetchError as error:
        return error


@pytest.mark.parametrize("reference", ["sub/ok.png", "sub/deeper/ok.png"])
def test_a_parent_directory_swapped_for_a_symlink_after_the_check_is_not_followed(reader, reference):
    """Before: the check passed, the open followed the swapped directory and read the outside file."""
    resolver, root, outside = reader
    resolver.path_reader.after_check = swap_for_symlink(root / "sub", outside)
    outcome = read_or_refuse(resolver, reference)
    assert outcome != OUTSIDE, "read a file outside IMAGE_ROOT"
    assert isinstance(outcome, FetchError) and outcome.reason == "outside_root", outcome


def test_the_file_itself_swapped_for_a_symlink_after_the_check_is_not_followed(reader):
    resolver, root, outside = reader

    def swap_file(_checked: Path) -> None:
        (root / "sub" / "ok.png").unlink()
        (root / "sub" / "ok.png").symlink_to(outside / "ok.png")

    resolver.path_reader.after_check = swap_file
    outcome = read_or_refuse(resolver, "sub/ok.png")
    assert isinstance(outcome, FetchError) and outcome.reason == "outside_root", outcome


def test_a_file_removed_after_the_check_is_not_found(reader):
    resolver, root, _ = reader
    resolver.path_reader.after_check = lambda _checked: (root / "sub" / "ok.png").unlink()
    outcome = read_or_refuse(resolver, "sub/ok.png")
    assert isinstance(outcome, FetchError) and outcome.reason == "not_found", outcome


@pytest.mark.parametrize(
    "reference", ["sub/ok.png", "sub/deeper/ok.png", "inside-link.png", "inside-dir-link/ok.png", "sub/../sub/ok.png"]
)
def test_paths_inside_the_root_are_read_by_either_opener(reader, reference):
    """Symlinks that stay inside the root still work: the check resolves them, the open needs none."""
    resolver, root, _ = reader
    assert resolver.read_path(reference) == INSIDE
    assert resolver.read_path(str(root / reference)) == INSIDE


@pytest.mark.parametrize(
    "reference, reason",
    [("../outside/ok.png", "outside_root"), ("sub", "not_a_file"), ("", "not_a_file"), ("nope.png", "not_found")],
)
def test_refusals_are_the_same_with_either_opener(reader, reference, reason):
    resolver, _, _ = reader
    outcome = read_or_refuse(resolver, reference)
    assert isinstance(outcome, FetchError) and outcome.reason == reason, outcome


@pytest.mark.parametrize("opener", opener_params())
def test_the_openers_refuse_symlinks_and_ways_out_themselves(opener, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file").write_bytes(b"x")
    (tmp_path / "link").symlink_to("dir")
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(opener(root_fd, "dir/file", os.O_RDONLY))
        for relative, expected in [("link/file", errno.ELOOP), ("../x", errno.EXDEV), ("dir/../../x", errno.EXDEV)]:
            with pytest.raises(OSError) as caught:
                os.close(opener(root_fd, relative, os.O_RDONLY))
            assert caught.value.errno == expected, relative
    finally:
        os.close(root_fd)


def test_openat2_is_used_where_the_kernel_has_it():
    from consumer.images import local

    expected = local.openat2_beneath if local.openat2_available() else local.walk_beneath
    assert ImageResolver(Settings(image_root="/")).path_reader.open_beneath is expected
