"""Collecting images: order, duplicates, symlinks that leave the folder, odd names."""

from __future__ import annotations

import os
from pathlib import Path

from memexport.runtime.files import collect_images


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folders_recursive_sorted_and_non_images_skipped(tmp_path):
    for name in ("b/z.png", "b/a.jpg", "a.JPG", "notes.txt", "c/d/e.webp"):
        touch(tmp_path / name)
    got = [p.relative_to(tmp_path).as_posix() for p in collect_images([tmp_path]).paths]
    assert got == ["a.JPG", "b/a.jpg", "b/z.png", "c/d/e.webp"]


def test_a_file_listed_twice_is_kept_once_and_reported(tmp_path):
    image = touch(tmp_path / "f" / "a.jpg")
    os.symlink(image, tmp_path / "f" / "alias.jpg")  # inside the folder: followed, same file
    found = collect_images([tmp_path / "f", image, Path(os.path.relpath(image))])
    assert found.paths == [image]
    assert sorted(p.name for p in found.duplicates) == ["a.jpg", "a.jpg", "alias.jpg"]


def test_symlinks_leaving_the_folder_are_rejected_unless_asked(tmp_path):
    secret = touch(tmp_path / "outside" / "secret.jpg")
    touch(tmp_path / "outside" / "sub" / "other.png")
    folder = tmp_path / "scored"
    touch(folder / "ok.jpg")
    os.symlink(secret, folder / "leak.jpg")
    os.symlink(tmp_path / "outside" / "sub", folder / "leakdir")
    found = collect_images([folder])
    assert [p.name for p in found.paths] == ["ok.jpg"]
    assert sorted((p.name, reason) for p, reason, _ in found.rejected) == [("leak.jpg", "symlink-outside"), ("leakdir", "symlink-outside")]
    assert all("--follow-symlinks" in detail for _, _, detail in found.rejected)
    followed = collect_images([folder], follow_symlinks=True)
    assert sorted(p.name for p in followed.paths) == ["leak.jpg", "ok.jpg", "other.png"] and not followed.rejected


def test_symlink_loops_terminate(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    found = collect_images([tmp_path / "a"], follow_symlinks=True)
    assert [p.name for p in found.paths] == ["x.jpg"]


def test_missing_arguments_and_non_utf8_names(tmp_path):
    name = os.fsdecode(b"\xff\xfe-odd.jpg")
    touch(tmp_path / name)
    found = collect_images([tmp_path, tmp_path / "nope.jpg"])
    assert [os.fsencode(p.name) for p in found.paths] == [b"\xff\xfe-odd.jpg"]
    assert found.missing == [(tmp_path / "nope.jpg", "missing")]
