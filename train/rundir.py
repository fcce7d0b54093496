"""The run directory: resolved config, metrics log, checkpoints, exported model.

::

    RUN/train_config.json               resolved TrainConfig + git commit, domains, classes, world size
    RUN/metrics.jsonl                   one JSON object per line: kind = train | val | sampler
    RUN/checkpoints/last.safetensors    everything --resume needs (model, optimiser, samplers, RNG, step)
    RUN/checkpoints/best.safetensors    model weights at the best merged validation R@1
    RUN/model/                          the exported inference model (UniversalEmbedder.save)
    RUN/summary.json                    written when the run finishes

A checkpoint is ONE safetensors file: the tensors (model, optimiser moments, torch RNG states) plus,
in its metadata, a JSON document with everything else (step, sampler and RNG states, optimiser
hyper-parameters). Nothing is ever unpickled: a ``last.pt`` of an older uniret (a pickle, which
could run code when loaded) is refused with a one-line error. Every file is written atomically, so a
run killed at any moment resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import UniretError
from ..safeio import parse_json, read_small
from ..utils import atomic_write_json, atomic_write_text, read_json

CHECKPOINT_FORMAT = "uniret-train-checkpoint/1"
#: Options that may change when a run is resumed; everything else must match config.json.
RESUMABLE_CHANGES = {"val_every", "ckpt_every", "log_every", "workers", "device", "val_batch_size", "extra",
                     "out"}  # a run directory may be moved between sessions


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.config_file = self.path / "train_config.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.last = self.checkpoints / "last.safetensors"
        self.best = self.checkpoints / "best.safetensors"
        self.legacy = [self.checkpoints / "last.pt", self.checkpoints / "best.pt"]
        self.model_dir = self.path / "model"
        self.summary_file = self.path / "summary.json"

    def is_run(self) -> bool:
        return self.config_file.is_file()

    def create(self, header: dict) -> None:
        """Start the run: its config first (so the directory is recognisable as a run from the first
        file on), then the checkpoint folder; a previous attempt's metrics are dropped."""
        try:
            atomic_write_json(self.config_file, header)
            self.checkpoints.mkdir(exist_ok=True)
            self.metrics_file.unlink(missing_ok=True)
        except OSError as exc:
            raise UniretError(f"--out {self.path}: cannot write the run directory ({exc.strerror or exc})") from None

    def read_config(self) -> dict | None:
        if not self.config_file.is_file():
            return None
        try:
            obj = read_json(self.config_file)
        except (OSError, ValueError) as exc:
            raise UniretError(f"{self.config_file}: unreadable ({exc}); it is not a uniret run") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict):
            raise UniretError(f"{self.config_file}: not a uniret run configuration")
        return obj

    def log(self, record: dict) -> None:
        """Append one JSON line (appends of one short line are atomic enough for a log)."""
        try:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            raise UniretError(f"{self.metrics_file}: cannot append ({exc.strerror or exc}); free space, then "
                              f"re-run with --resume") from None

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        text = read_small(self.metrics_file, "training log").decode("utf-8", "replace")
        return [parse_json(line, self.metrics_file, "training log") for line in text.splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint a resumed run continues from."""
        kept = [r for r in self.read_metrics() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def refuse_legacy(self) -> None:
        for path in self.legacy:
            if path.exists():
                raise UniretError(f"{path}: a pickle checkpoint of an older uniret is never loaded (it could run "
                                  f"code); start a new run with another --out")


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write tensors + a JSON state as one safetensors file, atomically (temporary name, rename)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:
        save_file(flat, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "state": json.dumps(state)})
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        raise UniretError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}); free space or fix "
                          f"permissions, then re-run with --resume") from None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint written by :func:`save_checkpoint`; anything else is refused."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise UniretError(f"{path}: not a uniret training checkpoint (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = parse_json(meta["state"], path, "checkpoint state")
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise UniretError(f"{path}: not a readable uniret training checkpoint ({exc}); "
                          f"start a new run with another --out") from None
    return tensors, state


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state as tensors (``<param>.<name>``) plus JSON (the rest, param groups)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The global RNG states: torch's (and CUDA's) as tensors, numpy's and Python's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                     "python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Names of options that differ between a run's config.json and the resumed config."""
    from .config import TrainConfig

    # An option that a run's config predates had its default then.
    saved_cfg = {**TrainConfig().to_json(), **saved.get("config", {})}
    return sorted(k for k in set(saved_cfg) | set(current)
                  if k not in RESUMABLE_CHANGES and saved_cfg.get(k) != current.get(k))
