"""``triton-repo``'s folder rule: ``--overwrite`` replaces only a repository memexport wrote (its marker, nothing
else in it), writing the new one beside it and swapping it in, so an artifact inside the old one still travels;
any other folder is refused in one line with nothing deleted. ``--check`` validates the version folders
Triton serves (its ``version_policy``: the latest by default), not the lowest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memexport.cli import app
from memexport.core.errors import UsageError
from memexport.triton.check import ModelRepositoryError, check_triton_repo
from memexport.triton.folder import MARKER
from memexport.triton.writer import triton_repo_from_artifacts
from tests.conftest import have
from tests.models import write_tiny_cnn

pytestmark = pytest.mark.skipif(not have("tritonclient"), reason="tritonclient is not installed (pip install 'memexport[triton]')")


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (``None`` for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".memexport-" in p.name)


def test_overwrite_refuses_a_folder_memexport_did_not_write_and_deletes_nothing(tmp_path, tiny):
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 my photo")
    (home / "notes.txt").write_text("mine")
    (home / "model" / "1").mkdir(parents=True)  # looks like a model folder, still not memexport's
    before = tree(home)
    result = CliRunner().invoke(app, ["triton-repo", "-m", str(tiny), "-o", str(home), "--overwrite"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: {home}: not a repository written by memexport triton-repo") and "nothing was deleted" in result.output
    assert tree(home) == before and leftovers(tmp_path) == []


def test_overwrite_replaces_memexports_own_repository_and_refuses_one_with_foreign_files(tmp_path, tiny):
    repo = tmp_path / "repo"
    triton_repo_from_artifacts([tiny], repo)
    assert (repo / MARKER).is_file()
    (repo / "tiny-scorer_onnx" / "config.pbtxt").write_text("edited by hand")  # memexport's file: replaced
    triton_repo_from_artifacts([tiny], repo, overwrite=True)
    assert "edited by hand" not in (repo / "tiny-scorer_onnx" / "config.pbtxt").read_text()
    check_triton_repo(repo)
    (repo / "my_model").mkdir()
    before = tree(repo)
    with pytest.raises(UsageError, match=r"holds my_model, which memexport did not write; nothing was deleted"):
        triton_repo_from_artifacts([tiny], repo, overwrite=True)
    assert tree(repo) == before and leftovers(tmp_path) == []


def test_an_artifact_inside_the_repository_is_still_copied_when_it_is_replaced(tmp_path, tiny):
    repo = tmp_path / "repo"
    triton_repo_from_artifacts([tiny], repo)
    inside = repo / "tiny-scorer_onnx" / "1" / "tiny.onnx"
    result = CliRunner().invoke(app, ["triton-repo", "-m", str(inside), "-o", str(repo), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert inside.read_bytes() == tiny.read_bytes() and sorted(check_triton_repo(repo))[0] == "tiny-scorer"
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_repository_untouched(tmp_path, tiny, monkeypatch):
    import memexport.triton.writer as writer

    repo = tmp_path / "repo"
    triton_repo_from_artifacts([tiny], repo)
    before = tree(repo)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_artifact_models", broken)
    with pytest.raises(OSError):
        triton_repo_from_artifacts([tiny], repo, overwrite=True)
    assert tree(repo) == before and leftovers(tmp_path) == []


def test_a_file_as_output_is_refused(tmp_path, tiny):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        triton_repo_from_artifacts([tiny], target, overwrite=True)
    assert target.read_text() == "x"


def test_check_validates_the_version_triton_serves(tmp_path, tiny):
    """A bad artifact in version 10 (numerically the latest, lexically not) fails the check; pinned to version 1
    by ``version_policy`` the repository passes again, and a policy naming no folder is one line."""
    repo = tmp_path / "repo"
    triton_repo_from_artifacts([tiny], repo)
    scorer = repo / "tiny-scorer_onnx"
    shutil.copytree(scorer / "1", scorer / "2")
    (scorer / "10").mkdir()
    write_tiny_cnn(scorer / "10" / "tiny.onnx")  # input [3, 32, 32]: not what the config declares
    with pytest.raises(ModelRepositoryError) as caught:
        check_triton_repo(repo)
    assert [line.split(": ", 1)[1].split(" dims")[0] for line in caught.value.problems] == ["input 'image'", "output 'score'"]
    assert "but 10/tiny.onnx has [3, 32, 32]" in caught.value.problems[0]
    config = scorer / "config.pbtxt"
    text = config.read_text()
    config.write_text(text + "version_policy {\n  specific {\n    versions: [1, 2]\n  }\n}\n")
    check_triton_repo(repo)
    config.write_text(text + "version_policy {\n  all {\n  }\n}\n")
    with pytest.raises(ModelRepositoryError, match="10/tiny.onnx"):
        check_triton_repo(repo)
    config.write_text(text + "version_policy {\n  specific {\n    versions: [7]\n  }\n}\n")
    with pytest.raises(ModelRepositoryError, match="version_policy: serves no version folder"):
        check_triton_repo(repo)
