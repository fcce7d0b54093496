"""CLI: ``uniret index ...``, ``uniret search``, ``uniret dedup`` (placeholder until index/ lands)."""

import typer

from ..errors import UniretError

index_app = typer.Typer(no_args_is_help=True)


@index_app.command("build")
def index_build() -> None:
    """Build an index from an embedding store."""
    raise UniretError("`uniret index build` is not implemented yet")


def search_command() -> None:
    """Search an index by image."""
    raise UniretError("`uniret search` is not implemented yet")


def dedup_command() -> None:
    """Find near-duplicates in an index."""
    raise UniretError("`uniret dedup` is not implemented yet")
