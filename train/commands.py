"""CLI: ``uniret train`` (placeholder until train/ lands)."""

from ..errors import UniretError


def train_command() -> None:
    """Train a universal embedding."""
    raise UniretError("`uniret train` is not implemented yet")
