"""The README and docs/ are not stale: every link and image they name
exists, every repository path they cite in code exists, the README fits a
screenful or two, every ``tilerseg ...`` command line in their code blocks
parses with the real command-line parser, and the cheap ones run.

The site itself is built by ``mkdocs build --strict`` in ``.ci/run``
(broken anchors, API references); this test needs no MkDocs."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 200
TEST_COMMAND = "python -m pytest -n 2 --dist loadgroup"  # .ci/run runs this (with -q): keep them together
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:tilerseg|tests|scripts|pipelines|docs)/[\w./-]*\w\.(?:py|ya?ml|md|png))")
CHEAP = {"models"}  # subcommands that run in a moment without inputs: run in-process too


def _docs() -> list[Path]:
    return [README, *PAGES]


def _blocks(path: Path, langs=("bash", "sh", "")) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang in langs]


def _command_lines(path: Path, program: str) -> list[str]:
    """The lines of shell code blocks that start with ``program``,
    continuation lines joined."""
    out = []
    for body in _blocks(path):
        text = body.replace("\\\n", " ")
        out += [line.strip() for line in text.splitlines() if line.strip().startswith(program + " ")]
    return out


def _argv(line: str) -> list[str]:
    """A shell line as argv: comments dropped, cut at the first pipe,
    redirection or ``&&``; ``[optional]`` brackets of a synopsis opened."""
    lex = shlex.shlex(line.replace("[", " ").replace("]", " "), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    argv = []
    for token in lex:
        if token and all(c in "();<>|&" for c in token):
            break
        argv.append(token)
    return argv


def _commands() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), line) for p in _docs() for line in _command_lines(p, "tilerseg")]


def test_readme_fits_and_keeps_the_ci_test_command():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    assert TEST_COMMAND in lines, f"the README's test command line must be exactly `{TEST_COMMAND}`"
    assert any(line.strip().startswith('python -m pytest -m "not slow"') for line in lines)
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND.replace("pytest ", "pytest -q ") in ci, ".ci/run no longer runs the README's test command"


@pytest.mark.parametrize("path", _docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_and_image_exists(path):
    missing = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page (mkdocs --strict checks those)
        file = target.split("#")[0]
        if not (path.parent / file).exists():
            missing.append(target)
    assert not missing, f"{path.name}: links to files that do not exist: {missing}"


@pytest.mark.parametrize("path", _docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_repository_path_cited_exists(path):
    cited = set(REPO_PATH.findall(path.read_text()))
    missing = sorted(c for c in cited if "*" not in c and not (ROOT / c).exists())
    assert not missing, f"{path.name} cites files that do not exist: {missing}"


def test_python_and_script_lines_name_what_exists():
    for path in _docs():
        for line in _command_lines(path, "python"):
            argv = _argv(line)
            if len(argv) > 1 and argv[1].endswith(".py"):
                assert (ROOT / argv[1]).exists(), f"{path.name}: {line}"
        for body in _blocks(path, langs=("python",)):
            compile(body, f"{path.name} python block", "exec")


def test_every_extra_named_exists():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for path in _docs():
        for named in re.findall(r"tilerseg\[([\w,-]+)\]|\.\[([\w,-]+)\]", path.read_text()):
            for extra in ",".join(named).split(","):
                assert not extra or extra in extras, f"{path.name} names the extra [{extra}], which pyproject.toml lacks"


def test_the_readme_has_commands_to_check():
    readme = [line for where, line in _commands() if where == "README.md"]
    assert len(readme) >= 10 and any(_argv(line)[1:2] == ["models"] for line in readme)


@pytest.mark.parametrize("where,line", _commands())
def test_command_lines_parse(where, line, capsys):
    from tilerseg.cli_args import build_parser

    argv = _argv(line)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        pytest.fail(f"{where}: `{line}` does not parse (exit {exit.code}): {capsys.readouterr().err.strip()}")
    assert args.command == argv[0]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["--version"],
                                  *sorted({tuple(_argv(line)[1:]) for _, line in _commands()
                                           if _argv(line)[1] in CHEAP})])
def test_cheap_commands_run_in_process(argv, capsys):
    from tilerseg.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit:  # --help and --version leave through argparse
        code = exit.code
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.strip()
    if argv == ("models",):
        assert "demo" in out.out


def test_a_session_that_skips_says_how_many_and_why(tmp_path):
    """A fresh clone without the shared data: one closing line names the
    skips and their reason, without -rs."""
    import subprocess
    import sys

    env = dict(os.environ, TILERSEG_TEST_DATA=str(tmp_path / "none"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                        "tests/test_first_hour.py::test_misspelt_names_suggest_the_nearest"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "1 skipped: 1 shared test data missing (docs/setup.md says where it comes from)" in r.stdout, r.stdout
