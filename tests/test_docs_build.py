"""``make docs`` is as strict as it claims: a broken link fails the build.

mkdocs' ``--strict`` counts the warnings it logs, and ``--quiet`` stops them being logged, so with
both a broken link passes. The command is read from the Makefile's ``docs`` recipe and run on a
copy of the site in a temporary folder: first as it is (it must build), then with one broken link
injected (it must fail, naming the link).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install 'memexport[docs]')")

ROOT = Path(__file__).resolve().parents[1]


def docs_command(site: Path) -> str:
    """The ``docs`` target's recipe line, with make's ``$(BIN)`` and ``$(SITE)`` filled in."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^docs:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert match is not None, "the Makefile has no docs target with a one-line recipe"
    return match.group(1).replace("$(BIN)", str(Path(sys.executable).parent)).replace("$(SITE)", str(site))


def site_copy(tmp_path: Path) -> Path:
    """The site's sources (config, pages, and the files its snippets include) in a fresh folder."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy2(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    for path in ROOT.glob("*.md"):
        shutil.copy2(path, copy / path.name)
    shutil.copytree(ROOT / "examples", copy / "examples")
    return copy


def build(copy: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", docs_command(copy / "site")], cwd=copy, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("link", ["../tools/serve_load.py", "no-such-page.md"])
def test_a_broken_link_fails_the_docs_build(tmp_path, link):
    copy = site_copy(tmp_path)
    clean = build(copy)
    assert clean.returncode == 0, f"the docs as they are must build:\n{clean.stdout}{clean.stderr}"
    page = copy / "docs" / "serving.md"
    page.write_text(page.read_text(encoding="utf-8") + f"\nSee [this]({link}).\n", encoding="utf-8")
    broken = build(copy)
    assert broken.returncode != 0, f"a broken link to {link} passed the build:\n{broken.stdout}{broken.stderr}"
    assert link in broken.stdout + broken.stderr
