"""The README's commands exist: every `uniret ...` line in its code blocks names a real command and
only options that command has, so the front door cannot drift from the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from uniret.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
    lines = []
    for lang, block in blocks:
        if lang not in ("", "bash", "sh"):
            continue  # e.g. the Python API example
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            for part in re.split(r"&&|\|", line):
                part = part.strip()
                m = re.search(r"(?:^|\s)(?:-m uniret\.cli|uniret)\s+(.*)$", part)
                if m and not part.startswith(("pip", "python")):
                    lines.append(m.group(1))
    return lines


def resolve(tokens: list[str]):
    """The click command a token list names, and the tokens left after its name."""
    command = typer.main.get_command(app)
    rest = list(tokens)
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return command, rest


def test_readme_has_commands():
    cmds = readme_commands()
    assert len(cmds) > 15
    assert any(c.startswith("demo") for c in cmds)


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_is_real(line):
    tokens = shlex.split(line)
    command, rest = resolve(tokens)
    is_group = hasattr(command, "commands")
    assert not is_group or command.invoke_without_command, f"incomplete command: {line}"
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    for tok in rest:
        if tok.startswith("--"):
            assert tok.split("=", 1)[0] in known, f"{tok} is not an option of `uniret {line}`"
