"""The outer loop of a run: steps until the step or time budget is spent, with logging, progress,
validation and checkpoints at their intervals, then the export (:class:`~uniret.train.trainer.Trainer`
does the work of each part)."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np

from ..utils import progress_bar


class MetricsWindow:
    """Loss values since the last ``train`` log line; non-finite (skipped) steps are counted apart."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)
        self.per_domain: dict[str, list[float]] = defaultdict(list)
        self.skipped = 0

    def add(self, domain: str, values: dict[str, float]) -> None:
        if not math.isfinite(values["loss"]):
            self.skipped += 1
            return
        for k, v in values.items():
            self.values[k].append(v)
        self.per_domain[domain].append(values["loss"])

    def record(self) -> dict:
        out = {k: float(np.mean(v)) for k, v in self.values.items()}
        out["per_domain_loss"] = {d: float(np.mean(v)) for d, v in self.per_domain.items()}
        out["nonfinite_steps"] = self.skipped
        self.__init__()
        return out


def fit(trainer) -> None:
    """Run ``trainer`` to the end of its budget and export the model."""
    config, run, ctx = trainer.config, trainer.run, trainer.ctx
    if trainer.step == 0 and config.val_every and len(trainer.val):
        trainer.validate()  # the untrained model: the baseline every later value is read against
    window = MetricsWindow()
    seen, session_start = 0, time.perf_counter()
    total = None if config.time_budget else config.steps
    with progress_bar(f"train {config.method}", total, disable=not ctx.is_main) as advance:
        advance(trainer.step)
        while not trainer.done():
            trainer.interrupt_point()
            started = time.perf_counter()
            domain, values, update = trainer.train_step()
            window.add(trainer.domains[domain], values)
            seen += config.batch_size
            if ctx.is_main and update is not None:
                run.log({**update, "kind": "sampler", "step": trainer.step, "first_step": update["step"],
                         "domains": trainer.domains})
            ips = seen / max(time.perf_counter() - session_start, 1e-9)
            probs = trainer.sampler.probabilities()
            advance(1, info=f"loss {values['loss']:.3f}  {ips:.0f} img/s  p=[{' '.join(f'{p:.2f}' for p in probs)}]")
            trainer.tick(time.perf_counter() - started)
            last = trainer.done()
            if trainer.step % config.log_every == 0 or last:
                if ctx.is_main:
                    run.log({"kind": "train", "step": trainer.step, **window.record(),
                             "probabilities": dict(zip(trainer.domains, probs, strict=True)),
                             **{k: v for k, v in values.items() if k.startswith("lr_")},
                             "elapsed_s": round(trainer.elapsed, 3), "images_per_s": ips,
                             "decode_failures": trainer.data.decode_failures})
                else:
                    window.record()
            started = time.perf_counter()
            if config.val_every and (trainer.step % config.val_every == 0 or last):
                trainer.validate()
            if (config.ckpt_every and trainer.step % config.ckpt_every == 0 or last) and not trainer.nonfinite:
                trainer.save_last()
            trainer.tick(time.perf_counter() - started)  # validation and checkpoints count against the budget
            if not last and trainer.done():  # the time budget ran out while validating or checkpointing
                if config.val_every:
                    trainer.validate()
                trainer.save_last()
    trainer.finish()
