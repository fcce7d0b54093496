"""CLI: ``uniret model ...`` and ``uniret embed`` (placeholder until embed/ lands)."""

import typer

from ..errors import UniretError

model_app = typer.Typer(no_args_is_help=True)


@model_app.command("init")
def model_init() -> None:
    """Make an untrained model directory."""
    raise UniretError("`uniret model init` is not implemented yet")


def embed_command() -> None:
    """Embed images into a store."""
    raise UniretError("`uniret embed` is not implemented yet")
