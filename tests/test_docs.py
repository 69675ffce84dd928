"""The documentation's examples cannot rot.

- Every ```python block in README.md and docs/*.md runs (the blocks of one page in order, in one namespace), unless
  the line before it is ``<!-- docs-test: skip (reason) -->``.
- Every ``bench ...`` command in a ```bash block parses with the real command-line parser, and the defenses,
  classifiers, suites and datasets it names exist.
- The notebook-style example ``docs/examples/toy_purifier.py`` runs end to end on real data (when present).
"""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path
from typing import List, Tuple

import pytest

from tests.conftest import REPO, needs_resnet20

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b")


def code_blocks(page: Path) -> List[Tuple[str, int, str, bool]]:
    """(language, first line number, code, skipped) of every fenced block of ``page``."""
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match and match.group(1):
            skipped = i > 0 and bool(SKIP.search(lines[i - 1]))
            start, i = i + 1, i + 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            blocks.append((match.group(1), start + 1, "\n".join(lines[start:i]), skipped))
        i += 1
    return blocks


def bench_commands(page: Path) -> List[Tuple[int, List[str]]]:
    """(line, argv after ``bench``) of every bench command in the page's bash blocks (``torchrun ... -- run`` too)."""
    commands = []
    for language, first, code, skipped in code_blocks(page):
        if language not in ("bash", "sh", "shell", "console") or skipped:
            continue
        lines = code.splitlines()
        joined = []  # (offset, line) with backslash continuations joined
        for offset, line in enumerate(lines):
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
            else:
                joined.append((offset, line.strip()))
        for offset, line in joined:
            line = line.removeprefix("$ ")
            words = shlex.split(line, comments=True) if line else []
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before the command
                words = words[1:]
            if not words:
                continue
            if words[0].rsplit("/", 1)[-1] == "bench":
                commands.append((first + offset, words[1:]))
            elif words[0].endswith("torchrun") and "--" in words:
                commands.append((first + offset, words[words.index("--") + 1 :]))
    return commands


PYTHON = [(page, line) for page in PAGES for language, line, _, skipped in code_blocks(page) if language == "python" and not skipped]
COMMANDS = [(page, line, argv) for page in PAGES for line, argv in bench_commands(page)]


def _id(page: Path, line: int) -> str:
    return f"{page.relative_to(REPO)}:{line}"


def _run_in(folder: Path, monkeypatch) -> None:
    """Run an example in ``folder`` (its runs/ goes there), with the data locations made absolute first."""
    import os

    for name in ("BENCH_DATA_DIR", "BENCH_WEIGHTS_DIR", "BENCH_CACHE_DIR", "BENCH_CHECKPOINT_DIR"):
        if os.environ.get(name):
            monkeypatch.setenv(name, str(Path(os.environ[name]).resolve()))
    monkeypatch.chdir(folder)


def test_the_docs_have_examples_to_check():
    assert len(PYTHON) >= 5 and len(COMMANDS) >= 30


@pytest.mark.parametrize("page", sorted({p for p, _ in PYTHON}), ids=lambda p: str(p.relative_to(REPO)))
def test_python_examples_run(page, tmp_path, monkeypatch):
    _run_in(tmp_path, monkeypatch)  # examples that write runs/ write them here
    namespace = {"__name__": f"docs_example_{page.stem.replace('-', '_')}"}
    for language, line, code, skipped in code_blocks(page):
        if language == "python" and not skipped:
            exec(compile(code, f"{page.relative_to(REPO)}:{line}", "exec"), namespace)  # noqa: S102 - our own docs


@pytest.mark.parametrize("page,line,argv", COMMANDS, ids=[_id(p, l) for p, l, _ in COMMANDS])
def test_bench_commands_parse_and_name_things_that_exist(page, line, argv):
    from bench.cli import _parser, _registries
    from bench.plugins import load_plugin

    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as exited:  # prints the help and exits 0
            _parser().parse_args(argv)
        assert exited.value.code == 0
        return
    args = _parser().parse_args(argv)
    for plugin in args.plugin + getattr(args, "run_plugins", []):
        path = REPO / plugin
        if path.is_file():
            load_plugin(path)
        else:
            return  # a user's own plug-in file in the example: its names cannot be checked
    registries = _registries()
    defense = getattr(args, "defense", None)
    if defense and args.command == "train":  # bench train --defense names a trainer
        from bench.training import TRAINERS

        assert defense in TRAINERS, f"{_id(page, line)}: no trainer {defense}"
    elif defense:
        for member in defense.split("+"):
            assert member in registries["defenses"], f"{_id(page, line)}: unknown defense {member}"
    classifier = getattr(args, "classifier", None)
    if classifier and not classifier.startswith(("robustbench:", "file:")):
        assert classifier in registries["classifiers"], f"{_id(page, line)}: unknown classifier {classifier}"
    dataset = getattr(args, "dataset", None)
    if dataset:
        assert dataset in registries["datasets"], f"{_id(page, line)}: unknown dataset {dataset}"
    suite = getattr(args, "suite", None)
    if suite:
        assert suite in registries["suites"], f"{_id(page, line)}: unknown suite {suite}"


@needs_resnet20
def test_the_notebook_style_example_runs(tmp_path, monkeypatch, capsys):
    _run_in(tmp_path, monkeypatch)
    runpy.run_path(str(REPO / "docs" / "examples" / "toy_purifier.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "toy-median on resnet20" in out and "robust accuracy" in out and "record:" in out
    assert list((tmp_path / "runs").glob("*.json"))


# A committed file names paths relative to the repository, the package or an environment variable's folder, never a
# machine's. KNOWN_MACHINE_PATHS lists files allowed to break the rule until they are remade (none left: the last, a
# jatp-table1 record, was rerun).
MACHINE_PATH = re.compile(r"""(?:^|["'\s(=:,])/(?:work|root|home|tmp|check|Users|mnt|opt|data|var|srv|scratch)/""")
KNOWN_MACHINE_PATHS: set = set()


def test_no_committed_file_names_a_machine_path():
    import subprocess

    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    found = []
    for name in listed.stdout.decode().split("\0"):
        path = REPO / name
        if not name or name in KNOWN_MACHINE_PATHS or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # binary: weights, pictures
            continue
        found += [f"{name}:{number}: {line.strip()[:120]}" for number, line in enumerate(text.splitlines(), 1)
                  if MACHINE_PATH.search(line)]
    assert found == [], "\n".join(found)
    assert all((REPO / name).is_file() for name in KNOWN_MACHINE_PATHS), "an exempted file is gone: drop it from the list"
