"""uniret.train: UDON online multi-teacher distillation and its baselines (METHOD.md §3).

Public API: :class:`TrainConfig`, :func:`train` (``config -> run directory``), :data:`DEMO_RECIPE`
and :func:`demo_config` (the small recipe that learns on the demo collection on a CPU). Importing
this package stays light (no torch) so that ``uniret --help`` is fast; :func:`train` loads lazily.
"""

__all__ = ["DEMO_RECIPE", "TrainConfig", "demo_config", "resolve_config", "train"]


def __getattr__(name: str):
    # Lazy: the CLI imports uniret.train.commands, and nothing else of training should load then.
    if name == "train":
        from .trainer import train

        return train
    if name in ("DEMO_RECIPE", "TrainConfig", "demo_config", "resolve_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'uniret.train' has no attribute {name!r}")
