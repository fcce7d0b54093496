"""uniret.train: UDON online multi-teacher distillation and its baselines (METHOD.md §3).

Public API: :class:`TrainConfig`, :func:`train` (``config -> run directory``), :data:`DEMO_RECIPE`
and :func:`demo_config` (the small recipe that learns on the demo collection on a CPU). Importing
this package stays light (no torch) so that ``uniret --help`` is fast; :func:`train` loads lazily.
"""

from .config import DEMO_RECIPE, TrainConfig, demo_config, resolve_config

__all__ = ["DEMO_RECIPE", "TrainConfig", "demo_config", "resolve_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from .trainer import train

        return train
    raise AttributeError(f"module 'uniret.train' has no attribute {name!r}")
