"""UDON against its baselines on one collection, end to end, with several seeds.

Rows (METHOD.md §3; only method and sampler differ, everything else is shared):

    untrained            the backbone + head at random init (no training; in the two-stage regime
                         the stage-1 backbone with a fresh head)
    stage1               the two-stage regime's stage-1 model itself (only with --stage1-steps)
    uscrr                universal head, separate per-domain classifiers, round-robin sampling
    ujc-size             universal head, one joint classifier, sampling proportional to dataset size
    udon-round_robin     UDON distillation, round-robin sampling
    udon-dynamic         UDON distillation, dynamic sampling (the method)
    udon-dynamic+sg      the udon-dynamic models with SuperGlobal reranking at query time
    specialist-oracle    one specialist per domain; each domain's queries and index embedded by its
                         own specialist (the domain label known at query time): an upper reference

Ablations (only when named in ``--rows``), UDON with round-robin sampling and one change:

    udon-rr-nodistill    distillation stopped at the backbone (``--no-distill-backbone``)
    udon-rr-rel-half     relational weight halved (relational_factor 0.125: at batch 128 the weight
                         L_rel has at batch 64, B/4 = 16)
    udon-rr-rel-double   relational weight doubled (relational_factor 0.5: B/4 of batch 256)
    udon-rr-joint        per-domain teachers distilled into a student with one joint classifier
                         (``--method udon_joint``)
    udon-joint-dynamic   the same with UDON's dynamic sampler (not an ablation of round-robin: the
                         row that leads in the pretrained study, docs/RESULTS.md)

Regimes: from scratch (``--backbone timm:...`` and a recipe ``--config``); two-stage
(``--stage1-steps N``: per seed, stage 1 trains ``--stage1-method`` on all training domains with
``--stage1-config``, stage 2 starts every row from that backbone with ``--config``, e.g.
``benchmarks/recipes/cpu_stage2.json``: backbone frozen for the first 20%, its lr a tenth of the
heads'); capacity (``--dim 16`` with ``teacher_dim`` 64 in the config).

Every model is selected on the VALIDATION split during training (``RUN/model`` holds the best
validated weights); the test split is evaluated once per final model, merged protocol (one index
for all domains), plus the separate protocol for the oracle. Everything goes through the ``uniret``
CLI, so the reports are the ones ``uniret eval`` writes and the table is also printed by
``uniret eval compare``. Re-running continues: finished trainings and reports are kept.

    python benchmarks/bench_methods.py --data bench64.lmdb --out bench-runs \\
        --backbone timm:test_resnet --image-size 64 --steps 1000 --batch-size 64 \\
        --config benchmarks/bench_methods_cpu.json --seeds 0,1

On a GPU machine the same command runs unchanged (add ``--device cuda``, raise ``--steps``,
``--batch-size`` and ``--image-size``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("mAP@100", "mMP@5", "R@1")
TRAINED = {  # row -> (method, sampler, config fields on top of --config)
    "uscrr": ("uscrr", "round_robin", {}),
    "ujc-size": ("ujc", "size", {}),
    "udon-round_robin": ("udon", "round_robin", {}),
    "udon-dynamic": ("udon", "dynamic", {}),
    "udon-rr-nodistill": ("udon", "round_robin", {"distill_to_backbone": False}),
    "udon-rr-rel-half": ("udon", "round_robin", {"relational_factor": 0.125}),
    "udon-rr-rel-double": ("udon", "round_robin", {"relational_factor": 0.5}),
    "udon-rr-joint": ("udon_joint", "round_robin", {}),
    "udon-joint-dynamic": ("udon_joint", "dynamic", {}),
}
ROWS = ("untrained", "stage1", "uscrr", "ujc-size", "udon-round_robin", "udon-dynamic", "udon-dynamic+sg",
        "specialist-oracle")
ABLATIONS = ("udon-rr-nodistill", "udon-rr-rel-half", "udon-rr-rel-double", "udon-rr-joint", "udon-joint-dynamic")


def uniret(*args: str, log: Path) -> float:
    """Run one ``uniret`` command (output appended to ``log``); return its wall time in seconds."""
    started = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ uniret {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "uniret.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"uniret {' '.join(args[:2])} failed (exit {r.returncode}); see {log}")
    return time.time() - started


def domains_of(data: str) -> list[str]:
    from uniret.data import open_collection

    return open_collection(data).domains


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "commands.log"
        self.timings_file = self.out / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.exists() else {}

    def record(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 1)
        tmp = self.timings_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.timings, indent=2, sort_keys=True))
        os.replace(tmp, self.timings_file)

    def common(self, seed: int, backbone: str | None = None, config: str | None = None) -> list[str]:
        a = self.args
        backbone = backbone or self.backbone(seed)
        opts = ["--data", a.data, "--backbone", backbone, *(["--pretrained"] if a.pretrained and not Path(backbone).is_dir() else []),
                "--steps", str(a.steps),
                "--batch-size", str(a.batch_size), "--val-every", str(a.val_every), "--ckpt-every", str(a.val_every),
                "--device", a.device, "--seed", str(seed)]
        if a.image_size and not Path(backbone).is_dir():  # a stage-1 model directory brings its own size
            opts += ["--image-size", str(a.image_size)]
        if a.dim:
            opts += ["--dim", str(a.dim)]
        config = config or a.config
        return opts + (["--config", config] if config else [])

    def backbone(self, seed: int) -> str:
        """The backbone every row starts from: --backbone, or this seed's stage-1 model (two-stage)."""
        if not self.args.stage1_steps:
            return self.args.backbone
        run = self.out / "runs" / f"stage1-s{seed}"
        if not (run / "summary.json").is_file():
            a = self.args
            opts = [*self.common(seed, backbone=a.backbone, config=a.stage1_config), "--steps", str(a.stage1_steps),
                    "--method", a.stage1_method, "--out", str(run)]
            resume = ["--resume"] if (run / "train_config.json").is_file() else []
            self.record(f"train stage1-s{seed}", uniret("train", *opts, *resume, log=self.log))
        return str(run / "model")

    def row_config(self, name: str, fields: dict) -> str | None:
        """--config plus the row's own fields, as one file (None when the row adds nothing)."""
        if not fields:
            return self.args.config
        base = json.loads(Path(self.args.config).read_text()) if self.args.config else {}
        path = self.out / "configs" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**base, **fields}, indent=2) + "\n")
        return str(path)

    def train(self, name: str, seed: int, method: str, sampler: str, fields: dict | None = None,
              domain: str | None = None) -> Path:
        run = self.out / "runs" / f"{name}-s{seed}"
        if (run / "summary.json").is_file() and (run / "model" / "config.json").is_file():
            return run / "model"
        extra = ["--domain", domain] if domain else []
        resume = ["--resume"] if (run / "train_config.json").is_file() else []
        seconds = uniret("train", *self.common(seed, config=self.row_config(name, fields or {})), "--method", method,
                         "--sampler", sampler, "--out", str(run), *extra, *resume, log=self.log)
        self.record(f"train {name}-s{seed}", seconds)
        return run / "model"

    def evaluate(self, name: str, seed: int, models: list[str], *extra: str) -> Path:
        report = self.out / "reports" / f"{name}-s{seed}"
        if not (report / "metrics.json").is_file():
            model_args = [a for m in models for a in ("--model", m)]
            seconds = uniret("eval", *model_args, "--data", self.args.data, "--split", "test", "--out", str(report),
                             "--cache-dir", str(self.out / "cache"), "--device", self.args.device,
                             "--batch-size", "256", *extra, log=self.log)
            self.record(f"eval {name}-s{seed}", seconds)
        return report

    def run_seed(self, seed: int) -> None:
        a = self.args
        rows = set(a.rows.split(",")) if a.rows else set(ROWS)
        unknown = rows - set(ROWS) - set(ABLATIONS)
        if unknown:
            sys.exit(f"unknown --rows {sorted(unknown)}; choose from {', '.join(ROWS + ABLATIONS)}")
        if "untrained" in rows:
            self.run_untrained(seed)
        if "stage1" in rows and a.stage1_steps:
            self.evaluate("stage1", seed, [self.backbone(seed)])
        for name, (method, sampler, fields) in TRAINED.items():
            if name in rows or (name == "udon-dynamic" and "udon-dynamic+sg" in rows):
                model = self.train(name, seed, method, sampler, fields)
                if name in rows:
                    self.evaluate(name, seed, [str(model)])
                if name == "udon-dynamic" and "udon-dynamic+sg" in rows:
                    self.evaluate("udon-dynamic+sg", seed, [str(model)], "--rerank", "superglobal")
        if "specialist-oracle" in rows:
            specialists = [f"{d}={self.train(f'specialist-{d}', seed, 'specialist', 'round_robin', domain=d)}"
                           for d in domains_of(a.data)]
            self.evaluate("specialist-oracle", seed, specialists, "--protocol", "both")

    def run_untrained(self, seed: int) -> None:
        a = self.args
        untrained = self.out / "models" / f"untrained-s{seed}"
        if not (untrained / "config.json").is_file():
            init = ["model", "init", "--backbone", self.backbone(seed), "--seed", str(seed), "--out", str(untrained),
                    *(["--pretrained"] if a.pretrained and not Path(self.backbone(seed)).is_dir() else [])]
            if a.image_size and not Path(self.backbone(seed)).is_dir():
                init += ["--image-size", str(a.image_size)]
            if a.dim:
                init += ["--dim", str(a.dim)]
            uniret(*init, log=self.log)
        self.evaluate("untrained", seed, [str(untrained)])


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation over seeds (just the value for one seed)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def summarize(out: Path, seeds: list[int], domains: list[str]) -> tuple[str, dict]:
    """A markdown table per protocol: mean ± standard deviation over seeds, per domain and the mean."""
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    data: dict = {}
    for row in ROWS + ABLATIONS:
        for seed in seeds:
            f = out / "reports" / f"{row}-s{seed}" / "metrics.json"
            if not f.is_file():
                continue
            for protocol, res in json.loads(f.read_text())["results"].items():
                entry = data.setdefault(protocol, {}).setdefault(row, {})
                for d, vals in [*res["per_domain"].items(), ("mean", res["mean"])]:
                    for m in METRICS:
                        entry.setdefault((d, m), []).append(vals[m])
    lines = []
    for protocol, rows in data.items():
        lines.append(f"\n**{protocol} protocol**, test split, mean ± standard deviation over seeds {seeds}\n")
        head = ["row", "seeds", *[f"mean {m}" for m in METRICS], *[f"{d} mAP@100" for d in domains],
                "train wall s"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for row, entry in rows.items():
            runs = {k: v for k, v in timings.items() if k.startswith("train ") and k[6:].rsplit("-s", 1)[1] in
                    {str(s) for s in seeds} and (k[6:].rsplit("-s", 1)[0] == row or
                                                 (row == "specialist-oracle" and "specialist-" in k))}
            seeds_run = {k.rsplit("-s", 1)[1] for k in runs}
            per_seed = sum(runs.values()) / len(seeds_run) if runs else None
            cells = [row, str(len(entry[("mean", "mAP@100")])), *[spread(entry[("mean", m)]) for m in METRICS],
                     *[spread(entry[(d, "mAP@100")]) if (d, "mAP@100") in entry else "-" for d in domains],
                     f"{per_seed:.0f}" if per_seed else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    flat = {p: {r: {f"{d}/{m}": v for (d, m), v in e.items()} for r, e in rows.items()} for p, rows in data.items()}
    return "\n".join(lines), {"seeds": seeds, "results": flat, "timings": timings}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="packed LMDB store (or collection root)")
    p.add_argument("--out", required=True, help="folder for runs, reports, cache and results")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--backbone", default="timm:test_resnet")
    p.add_argument("--pretrained", action="store_true", help="start every row from the backbone's pretrained weights")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--config", default=None, help="JSON of further TrainConfig fields shared by every run")
    p.add_argument("--device", default="auto")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated subset of: {', '.join(ROWS + ABLATIONS)} (default: {', '.join(ROWS)})")
    p.add_argument("--dim", type=int, default=None, help="universal embedding size (capacity regime: 16)")
    p.add_argument("--stage1-steps", type=int, default=0, help="two-stage regime: steps of stage 1 (0 = from scratch)")
    p.add_argument("--stage1-method", default="ujc", help="two-stage regime: the method of stage 1")
    p.add_argument("--stage1-config", default=None, help="two-stage regime: TrainConfig fields of stage 1")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    bench = Bench(args)
    started = time.time()
    for seed in seeds:
        bench.run_seed(seed)
    reports = sorted(str(r) for r in (bench.out / "reports").iterdir() if (r / "metrics.json").is_file())
    subprocess.run([sys.executable, "-m", "uniret.cli", "eval", "compare", *reports], check=True)
    table, payload = summarize(bench.out, seeds, domains_of(args.data))
    payload.update(settings=vars(args), wall_seconds=round(time.time() - started, 1))
    (bench.out / "results.md").write_text(table + "\n")
    (bench.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(table)
    print(f"\nresults: {bench.out / 'results.md'}; this invocation took {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
