"""CLI: ``uniret eval`` and ``uniret demo`` (placeholder until eval/ lands)."""

import typer

from ..errors import UniretError

eval_app = typer.Typer(help="Evaluate retrieval the UnED way.")


@eval_app.command("compare")
def eval_compare() -> None:
    """Compare reports side by side."""
    raise UniretError("`uniret eval compare` is not implemented yet")


def demo_command() -> None:
    """Run the whole pipeline on the demo data."""
    raise UniretError("`uniret demo` is not implemented yet")
