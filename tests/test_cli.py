"""The command line as a whole: ``--help`` on every command and subcommand, ``--version``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

import uniret
from uniret.cli import app, main


def command_paths(command=None, path=()) -> list[tuple[str, ...]]:
    """Every command and group of the click tree, as the words that invoke it."""
    command = command or typer.main.get_command(app)
    out = [path]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        out.extend(command_paths(sub, (*path, name)))
    return out


def test_the_tree_has_every_command():
    paths = command_paths()
    for expected in [("data", "pack"), ("model", "init"), ("index", "build"), ("search",), ("eval", "compare"),
                     ("train",), ("demo",)]:
        assert expected in paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "uniret")
def test_help_of_every_command(path, capsys):
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: uniret" in out and " ".join(path) in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"uniret {uniret.__version__}\n"
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.+)"$', pyproject, re.M).group(1) == uniret.__version__


def test_a_bug_is_one_line_unless_debugging(monkeypatch, tmp_path, capsys):
    """An exception no error class describes (a bug, e.g. a number a library cannot hold) is still ONE
    line and exit 1; UNIRET_DEBUG=1 shows the traceback."""
    import uniret.data.validate as validate

    def broken(*args, **kwargs):
        raise TypeError("empty(): argument 'size' failed\nframe #0: c10::Error")

    monkeypatch.setattr(validate, "check_collection", broken)
    monkeypatch.delenv("UNIRET_DEBUG", raising=False)
    (tmp_path / "root").mkdir()
    capsys.readouterr()
    code = main(["data", "check", str(tmp_path / "root")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: internal error (TypeError: empty()") and "UNIRET_DEBUG=1" in lines[0]
    monkeypatch.setenv("UNIRET_DEBUG", "1")
    with pytest.raises(TypeError):
        main(["data", "check", str(tmp_path / "root")])
