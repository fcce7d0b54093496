"""The ``uniret`` command line.

Command groups live next to the code they drive (``data/commands.py``, ``embed/commands.py``, ...)
and import their heavy dependencies inside the commands, so ``uniret --help`` stays fast and
searching never imports the trainer. :func:`main` is the one error path: every expected failure
(:class:`~uniret.errors.UniretError`, bad options, and the classes :func:`uniret.errors.describe`
knows) becomes one line on stderr and an exit code; ``UNIRET_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from .data.commands import app as data_app
from .demo import demo_command
from .embed.commands import embed_command, model_app, store_app
from .errors import describe
from .eval.commands import eval_app
from .index.commands import dedup_command, index_app, search_command
from .serve.commands import serve_command
from .train.commands import train_command

app = typer.Typer(
    name="uniret",
    help="Universal image embedding and retrieval: train (UDON), embed, index, search, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"uniret {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Universal image embedding and retrieval: train (UDON), embed, index, search, evaluate."""


app.add_typer(data_app, name="data", help="Collections: validate, pack into LMDB, make demo data.")
app.add_typer(model_app, name="model", help="Model directories: create and inspect.")
app.command("embed")(embed_command)
app.add_typer(store_app, name="store", help="Embedding stores: merge parts, inspect.")
app.add_typer(index_app, name="index", help="Build, update and inspect search indexes.")
app.command("search")(search_command)
app.command("dedup")(dedup_command)
app.command("serve")(serve_command)
app.command("train")(train_command)
app.add_typer(eval_app, name="eval")
app.command("demo")(demo_command)


def debug_enabled() -> bool:
    return os.environ.get("UNIRET_DEBUG", "").strip() not in ("", "0", "false", "no")


#: What to tell after Ctrl-C, for the commands that continue where they stopped when re-run.
RESUMABLE = {
    "data pack": "re-run the same command to resume",
    "embed": "re-run the same command to resume",
    "index build": "re-run the same command to resume",
    "eval": "re-run the same command to resume",
    "demo": "re-run the same command to resume",
    "train": "re-run with --resume to continue from the last checkpoint",
}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it per call); of
    other libraries' records (timm, faiss, the hub client) only warnings and errors."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.addFilter(lambda r: r.name.split(".")[0] == "uniret" or r.levelno >= logging.WARNING)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one ``warning:`` line (no source line, no file path)."""
    text = " ".join(str(message).split())
    sys.stderr.write(f"warning: {_flat(text[:300])}\n")


def _flat(text: str) -> str:
    """A message on one line that is safe on a terminal, whatever the names in it hold (a path with
    a newline, an escape sequence or bytes that are not UTF-8)."""
    from .display import printable

    return printable(text)


class _OneLineFormatter(logging.Formatter):
    """Log records as one terminal-safe line each (names in them may hold newlines or escapes)."""

    def format(self, record: logging.LogRecord) -> str:
        return _flat(super().format(record))


def command_path(command, argv: list[str]) -> str:
    """``"data pack"`` for ``["data", "pack", ...]``: the (sub)command names at the start of ``argv``."""
    names = []
    for token in argv:
        sub = getattr(command, "commands", {}).get(token)
        if sub is None:
            break
        names.append(token)
        command = sub
    return " ".join(names)


def _is_usage_error(exc: Exception) -> bool:
    """typer's (or click's) parsing errors: unknown options, bad values, missing arguments."""
    return type(exc).__module__.split(".")[0] in ("typer", "click") and hasattr(exc, "format_message")


def _usage_error(exc: Exception, where: str) -> int:
    if type(exc).__name__ == "NoArgsIsHelpError":  # a group called without a command: its help
        typer.echo(exc.format_message(), err=True)
    else:
        hint = f"; see `uniret {where + ' ' if where else ''}--help`"
        typer.echo(f"error: {_flat(' '.join(exc.format_message().split()).rstrip('.'))}{_flat(hint)}", err=True)
    return getattr(exc, "exit_code", 2)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and, as a script, exits with) the exit code.

    Every expected failure ends here as one line on stderr (:func:`uniret.errors.describe`): bad
    options (exit 2), bad input or a bad machine state such as a full disk (exit 1), Ctrl-C (130,
    saying whether re-running resumes). Anything else is a bug, reported as one "internal error" line
    (exit 1). ``UNIRET_DEBUG=1`` re-raises every exception with its traceback.
    """
    argv = [os.fspath(a) for a in (sys.argv[1:] if argv is None else argv)]
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        # Ours even when a host (a test runner, a notebook) configured logging first: uniret's lines
        # must reach stderr as a user would see them.
        handler = _StderrHandler()
        handler.setFormatter(_OneLineFormatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug_enabled() else logging.INFO)
    command = typer.main.get_command(app)
    show_warning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        with command.make_context("uniret", argv) as ctx:
            command.invoke(ctx)
        return 0
    except typer.Exit as exc:  # --help, --version, typer.Exit(code) from a command
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        if debug_enabled():
            raise
        resume = RESUMABLE.get(command_path(command, argv))
        typer.echo(f"uniret: interrupted{'; ' + resume if resume else ''}", err=True)
        return 130
    except BrokenPipeError:
        # stdout closed early (`uniret search ... | head`): nothing left to say, and nowhere to say it;
        # point stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if _is_usage_error(exc):
            return _usage_error(exc, command_path(command, argv))
        if debug_enabled():
            raise
        known = describe(exc)
        if known is None:  # a bug, not bad input: still one line; the traceback with UNIRET_DEBUG=1
            known = (f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); re-run with "
                     "UNIRET_DEBUG=1 for the traceback and report it", 1)
        message, code = known
        typer.echo(f"error: {_flat(message)}", err=True)
        return code
    finally:
        warnings.showwarning = show_warning


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
