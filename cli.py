"""The ``uniret`` command line.

Command groups live next to the code they drive (``data/commands.py``, ``embed/commands.py``, ...)
and import their heavy dependencies inside the commands, so ``uniret --help`` stays fast and
searching never imports the trainer. :func:`main` turns :class:`~uniret.errors.UniretError` into a
one-line message and an exit code; ``UNIRET_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from .data.commands import app as data_app
from .demo import demo_command
from .embed.commands import embed_command, model_app
from .errors import UniretError
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
app.add_typer(index_app, name="index", help="Build, update and inspect search indexes.")
app.command("search")(search_command)
app.command("dedup")(dedup_command)
app.command("serve")(serve_command)
app.command("train")(train_command)
app.add_typer(eval_app, name="eval")
app.command("demo")(demo_command)


def debug_enabled() -> bool:
    return os.environ.get("UNIRET_DEBUG", "").strip() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and, as a script, exits with) the exit code."""
    logging.basicConfig(
        level=logging.DEBUG if debug_enabled() else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    command = typer.main.get_command(app)
    try:
        # standalone mode: typer formats usage errors itself (exit 2) and ends with SystemExit.
        command.main(args=argv, prog_name="uniret", standalone_mode=True)
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        typer.echo("uniret: interrupted; re-run the same command to resume", err=True)
        return 130
    except UniretError as exc:
        if debug_enabled():
            raise
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
