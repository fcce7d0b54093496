"""The run directory: resolved config, metrics log, checkpoints, exported model.

::

    RUN/train_config.json    resolved TrainConfig + git commit, domains, classes, world size
    RUN/metrics.jsonl        one JSON object per line: kind = train | val | sampler
    RUN/checkpoints/last.pt  everything --resume needs (model, optimiser, samplers, RNG, step)
    RUN/checkpoints/best.pt  model weights at the best merged validation R@1
    RUN/model/               the exported inference model (UniversalEmbedder.save)
    RUN/summary.json         written when the run finishes

Every file is written atomically, so a run killed at any moment resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..utils import atomic_write_json, atomic_write_text, read_json

#: Options that may change when a run is resumed; everything else must match config.json.
RESUMABLE_CHANGES = {"val_every", "ckpt_every", "log_every", "workers", "device", "val_batch_size", "extra"}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.config_file = self.path / "train_config.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.model_dir = self.path / "model"
        self.summary_file = self.path / "summary.json"

    def prepare(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def write_config(self, obj: dict) -> None:
        atomic_write_json(self.config_file, obj)

    def read_config(self) -> dict | None:
        return read_json(self.config_file) if self.config_file.is_file() else None

    def log(self, record: dict) -> None:
        """Append one JSON line (appends of one short line are atomic enough for a log)."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint a resumed run continues from."""
        kept = [r for r in self.read_metrics() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def save_checkpoint(self, path: Path, state: dict) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Path) -> dict:
        # Our own file (config, sampler state, numpy RNG state): not weights_only-safe by design.
        return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_differences(saved: dict, current: dict) -> list[str]:
    """Names of options that differ between a run's config.json and the resumed config."""
    saved_cfg = saved.get("config", {})
    return sorted(k for k in set(saved_cfg) | set(current)
                  if k not in RESUMABLE_CHANGES and saved_cfg.get(k) != current.get(k))
