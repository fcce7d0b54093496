"""UDON against its baselines in the pretrained regime, on a CPU: heads on the frozen backbone
(``--blocks 0``) or the last N stages fine-tuned (``--blocks N``), both trained on cached features,
or the whole network fine-tuned (``--full``: no cache, the paper's recipe of a backbone frozen for
the first 20% and a backbone lr below the heads'; meant for a small step count on a CPU, or a GPU).

Every row is trained by ``uniret train`` (``--freeze-backbone`` or ``--train-blocks N``; one feature
cache shared by every run, keyed by content), selected on the validation split during training, and
its test split evaluated once: merged protocol (one index for all domains) with uniret's metric code.
Since the frozen prefix is the same for every row, the test images' prefix outputs are computed once
(eval transform) and each model's rest and head are applied to them, exactly what ``uniret eval``
computes image by image. With ``--full`` the "prefix" is the identity: the test images are
preprocessed once and each fine-tuned model embeds them whole.

Rows: ``uscrr``, ``ujc-size``, ``udon-round_robin``, ``udon-dynamic``, ``udon-rr-joint`` (per-domain
teachers distilled into a student whose classifier spans all domains: UDON's distillation with UJC's
joint student classifier; ``udon-joint-size`` and ``udon-joint-dynamic`` the same with UJC's size
sampler or UDON's dynamic one, so that only the distillation tells them from ``ujc-size``),
``specialist-oracle`` (one specialist per domain, each domain's queries and
index embedded by its own specialist: separate protocol), and two untrained rows: ``none`` (the
pretrained backbone's pooled features) and ``pca`` (PCA-whitening fitted on the test index images,
its shrinkage chosen on validation). For the UDON rows, the teachers' own embeddings (per domain,
separate protocol) are evaluated beside the student's, with the last training losses of both: is
the teacher stronger than the student here (the premise of distillation)?

    python benchmarks/frozen_study.py --data BENCH --out study-frozen --backbone timm:tf_efficientnet_lite0 \\
        --pretrained --image-size 128 --blocks 0 --steps 2000 --seeds 0,1,2

Writes OUT/results.md and OUT/results.json; re-running continues (finished runs are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("mAP@100", "mMP@5", "R@1")
TRAINED = {  # row -> (method, sampler)
    "uscrr": ("uscrr", "round_robin"),
    "ujc-size": ("ujc", "size"),
    "udon-round_robin": ("udon", "round_robin"),
    "udon-dynamic": ("udon", "dynamic"),
    "udon-rr-joint": ("udon_joint", "round_robin"),
    "udon-joint-size": ("udon_joint", "size"),  # UJC's sampler, so only the distillation differs from ujc-size
    "udon-joint-dynamic": ("udon_joint", "dynamic"),
}
ROWS = (*TRAINED, "specialist-oracle", "none", "pca")


def sh(args: list[str], log: Path) -> float:
    started = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ uniret {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "uniret.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"uniret {' '.join(args[:2])} failed (exit {r.returncode}); see {log}")
    return time.time() - started


class Study:
    def __init__(self, a: argparse.Namespace):
        from uniret.data import open_collection
        from uniret.eval.embeddings import plan_items

        self.a, self.out = a, Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "commands.log"
        self.collection = open_collection(a.data)
        self.domains = [d for d in self.collection.domains if self.collection.has_split(d, "train")]
        self.items, self.pairs = {}, {}
        for split in ("val", "test"):
            self.items[split], self.pairs[split] = plan_items(self.collection, split)
        self.blocks = a.blocks or None
        self.tag = f"full-{a.image_size}px" if a.full else f"b{a.blocks}"
        self._last_eb: tuple[object, str, torch.Tensor] | None = None  # (model, split, features)
        self.base = self._base_model()
        self.prefix_out = {s: self._prefix_outputs(s) for s in ("val", "test")}

    # -- the shared frozen part ----------------------------------------------------------------------
    def _model_options(self) -> list[str]:
        a = self.a
        opts = ["--backbone", a.backbone, "--image-size", str(a.image_size)]
        if a.pretrained:
            opts.append("--pretrained")
        if a.weights:
            opts += ["--weights", a.weights]
        return opts

    def _base_model(self):
        path = self.out / "models" / "none"
        if not (path / "config.json").is_file():
            sh(["model", "init", *self._model_options(), "--head", "none", "--out", str(path)], self.log)
        from uniret.embed.model import load_model

        return load_model(path)

    def _split(self, model):
        from uniret.train.frozen import split_backbone

        if self.a.full:
            return torch.nn.Identity(), model.backbone.eval()
        return split_backbone(model.backbone.eval(), self.blocks)

    def _prefix_outputs(self, split: str) -> torch.Tensor:
        f = self.out / f"prefix-{split}-{self.tag}.npy"
        if not f.is_file():
            from uniret.data.collection import ItemList
            from uniret.embed.extract import EmbedDataset

            prefix, _ = self._split(self.base)
            items = ItemList(self.items[split], *self._item_source())
            ds = EmbedDataset(items, np.arange(len(items)), self.base.transforms()[1],
                              self.base.config.preprocess["input_size"])
            loader = torch.utils.data.DataLoader(ds, batch_size=128, num_workers=2)
            outs = []
            with torch.inference_mode():
                for _, x, ok, _ in loader:
                    if not bool(ok.all()):
                        sys.exit(f"unreadable {split} images: fix the data first")
                    outs.append(prefix(x).half().numpy())
            np.save(f, np.concatenate(outs))
        return torch.from_numpy(np.load(f))

    def _item_source(self):
        probe = self.collection.items(domains=[self.domains[0]], splits=["train"])
        return probe.source, probe.base

    def backbone_features(self, model, split: str) -> torch.Tensor:
        """L2-normalised pooled backbone features of a split, from the cached prefix outputs (the last
        model's test features are kept: the teacher check reuses them)."""
        # the model itself is held (not its id, which a later model could reuse)
        if self._last_eb is not None and self._last_eb[0] is model and self._last_eb[1] == split:
            return self._last_eb[2]
        _, rest = self._split(model)
        with torch.inference_mode():
            e_b = torch.cat([F.normalize(rest(c.float()), dim=-1) for c in self.prefix_out[split].split(256)])
        self._last_eb = (model, split, e_b)
        return e_b

    def embed(self, model, split: str) -> np.ndarray:
        """The model's embeddings of a split's evaluation items."""
        with torch.inference_mode():
            return model.embed_features(self.backbone_features(model, split)).numpy()

    # -- training ----------------------------------------------------------------------------------------
    def config_file(self) -> str:
        a = self.a
        cfg = {"head_lr": a.head_lr, "backbone_lr": a.backbone_lr, "backbone_freeze_fraction": 0.0,
               "lr_schedule": "cosine", "warmup_fraction": 0.05, "dynamic_interval": max(1, a.steps // 10),
               "dynamic_window": max(1, a.steps // 10), "log_every": max(1, min(50, a.steps // 20)),
               "cache_views": a.views, "feature_cache": str(Path(a.feature_cache).resolve()), "val_batch_size": 256}
        if a.full:  # the whole network trains on augmented images: no cache; the backbone waits 20%
            del cfg["cache_views"], cfg["feature_cache"]
            cfg["backbone_freeze_fraction"] = 0.2
        elif self.blocks:
            cfg["train_blocks"] = self.blocks
        else:
            cfg["freeze_backbone"] = True
        cfg.update(json.loads(a.extra))
        path = self.out / "recipe.json"
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        return str(path)

    def train(self, name: str, seed: int, method: str, sampler: str, domain: str | None = None) -> Path:
        run = self.out / "runs" / f"{name}-s{seed}"
        if not (run / "summary.json").is_file():
            if run.exists():
                import shutil

                shutil.rmtree(run)
            a = self.a
            args = ["train", "--data", a.data, *self._model_options(), "--config", self.config_file(),
                    "--method", method, "--sampler", sampler, "--steps", str(a.steps), "--batch-size",
                    str(a.batch_size), "--seed", str(seed), "--val-every", str(a.val_every), "--ckpt-every",
                    str(a.steps), "--device", "cpu", "--out", str(run), *(["--domain", domain] if domain else [])]
            self.timings[f"{name}-s{seed}"] = round(sh(args, self.log), 1)
        return run

    # -- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, vectors: np.ndarray, protocol: str = "merged") -> dict:
        from uniret.eval.protocol import evaluate_embeddings

        out = {"mean": {}, "per_domain": {}}
        q_rows, x_rows = [], []
        for i, it in enumerate(self.items["test"]):
            q, x = self.pairs["test"][it.domain]
            (q_rows if it.split == q else x_rows).append(i)
        items = self.items["test"]
        r = evaluate_embeddings(vectors[q_rows], [items[i] for i in q_rows], vectors[x_rows],
                                [items[i] for i in x_rows], self_match=False, k=100, protocol=protocol)
        out["mean"] = {m: r["mean"][m] for m in METRICS}
        out["per_domain"] = {d: {m: row[m] for m in METRICS} for d, row in r["per_domain"].items()}
        return out

    def teacher_vs_student(self, run: Path, model) -> dict:
        """Per domain, separate protocol: the teacher's own embedding against the student's."""
        from uniret.train.rundir import load_checkpoint

        tensors, _ = load_checkpoint(run / "checkpoints" / "last.safetensors")
        result = {}
        e_b = self.backbone_features(model, "test")
        with torch.inference_mode():
            student = model.embed_features(e_b).numpy()
        student_separate = self.evaluate(student, "separate")["per_domain"]
        for d_index, d in enumerate(self.domains):
            w = tensors[f"model.heads.teacher_heads.{d_index}.weight"]
            b = tensors[f"model.heads.teacher_heads.{d_index}.bias"]
            teacher = F.normalize(e_b @ w.T + b, dim=-1).numpy()
            rows = [i for i, it in enumerate(self.items["test"]) if it.domain == d]
            vecs_t = np.zeros((len(student), teacher.shape[1]), np.float32)
            vecs_t[rows] = teacher[rows]
            result[d] = {"teacher_mAP@100": self.evaluate(vecs_t, "separate")["per_domain"][d]["mAP@100"],
                         "student_mAP@100": student_separate[d]["mAP@100"]}
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        tail = train[-max(1, len(train) // 10):]
        result["loss"] = {k: float(np.mean([r[k] for r in tail])) for k in ("cls_teacher", "cls_student")}
        return result

    def run(self) -> dict:
        from uniret.embed.model import load_model

        a = self.a
        self.timings_file = self.out / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}
        results_file = self.out / "rows.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        rows = a.rows.split(",")

        def save():
            results_file.write_text(json.dumps(results, indent=1))
            self.timings_file.write_text(json.dumps(self.timings, indent=1))

        if "none" in rows and "none" not in results:
            results["none"] = {"0": self.evaluate(self.embed(self.base, "test"))}
            save()
        if "pca" in rows and "pca" not in results:
            results["pca"] = {"0": self.pca()}
            save()
        for seed in [int(s) for s in a.seeds.split(",")]:
            for name, (method, sampler) in TRAINED.items():
                key = str(seed)
                if name not in rows or key in results.get(name, {}):
                    continue
                run = self.train(name, seed, method, sampler)
                model = load_model(run / "model")
                row = self.evaluate(self.embed(model, "test"))
                summary = json.loads((run / "summary.json").read_text())
                row.update(best_step=summary["best_step"], steps=summary["steps"], seconds=summary["train_seconds"])
                if method.startswith("udon"):
                    row["teacher_vs_student"] = self.teacher_vs_student(run, model)
                results.setdefault(name, {})[key] = row
                save()
            if "specialist-oracle" in rows and str(seed) not in results.get("specialist-oracle", {}):
                vectors = None
                for d in self.domains:
                    model = load_model(self.train(f"specialist-{d}", seed, "specialist", "round_robin", d) / "model")
                    v = self.embed(model, "test")
                    vectors = np.zeros_like(v) if vectors is None else vectors
                    rows_d = [i for i, it in enumerate(self.items["test"]) if it.domain == d]
                    vectors[rows_d] = v[rows_d]
                results.setdefault("specialist-oracle", {})[str(seed)] = self.evaluate(vectors, "separate")
                save()
        return results

    def pca(self) -> dict:
        """PCA-whitening to the student's size, fitted on the test index images (no labels); the
        shrinkage chosen on the validation split (fitted on the val images)."""
        from uniret.embed.pca import pca_whitening
        from uniret.eval.protocol import evaluate_embeddings

        _, rest = self._split(self.base)

        def e_b(split):
            with torch.inference_mode():
                return torch.cat([F.normalize(rest(c.float()), dim=-1) for c in self.prefix_out[split].split(512)]).numpy()

        val, test = e_b("val"), e_b("test")
        choices = {}
        for shrink in (0.0, 0.01, 0.1, 1.0):
            w, b = pca_whitening(val, self.a.dim, shrink)
            z = val @ w.T + b
            z /= np.linalg.norm(z, axis=1, keepdims=True)
            r = evaluate_embeddings(z, self.items["val"], z, self.items["val"], self_match=True, k=100)
            choices[shrink] = r["mean"]["mAP@100"]
        shrink = max(choices, key=choices.get)
        index_rows = [i for i, it in enumerate(self.items["test"]) if it.split == self.pairs["test"][it.domain][1]]
        w, b = pca_whitening(test[index_rows], self.a.dim, shrink)
        z = test @ w.T + b
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        out = self.evaluate(z)
        out["shrink"], out["val_choices"] = shrink, choices
        return out


def spread(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} ± {float(np.std(values, ddof=1)):.3f}"


def mean_of(values: list) -> str:
    """A per-domain cell: the mean of the seeds that measured it (a domain without test queries has none)."""
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f}" if values else "n/a"


def table(results: dict, domains: list[str]) -> str:
    lines = ["| row | seeds | mAP@100 | mMP@5 | R@1 | " + " / ".join(domains) + " mAP@100 |",
             "|---|---|---|---|---|---|"]
    for name, by_seed in results.items():
        runs = list(by_seed.values())
        cells = [spread([r["mean"][m] for r in runs]) for m in METRICS]
        per = " / ".join(mean_of([r["per_domain"].get(d, {}).get("mAP@100") for r in runs]) for d in domains)
        lines.append(f"| {name} | {len(runs)} | {' | '.join(cells)} | {per} |")
    tvs = [(name, r["teacher_vs_student"]) for name, by_seed in results.items() for r in by_seed.values()
           if "teacher_vs_student" in r]
    if tvs:
        lines += ["", "Teacher vs student (test, separate protocol, mean over seeds; last 10% of training losses):", "",
                  "| row | " + " | ".join(f"{d} teacher / student" for d in domains) + " | loss teacher / student |",
                  "|---|" + "---|" * (len(domains) + 1)]
        for name in dict.fromkeys(n for n, _ in tvs):
            rs = [t for n, t in tvs if n == name]
            cells = [f"{mean_of([t[d]['teacher_mAP@100'] for t in rs])} / {mean_of([t[d]['student_mAP@100'] for t in rs])}"
                     for d in domains]
            loss = f"{np.mean([t['loss']['cls_teacher'] for t in rs]):.3f} / {np.mean([t['loss']['cls_student'] for t in rs]):.3f}"
            lines.append(f"| {name} | {' | '.join(cells)} | {loss} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default="timm:tf_efficientnet_lite0")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--weights", default=None)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--blocks", type=int, default=0, help="0: heads on the frozen backbone; N: last N stages train")
    p.add_argument("--full", action="store_true", help="fine-tune the whole network (no feature cache)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--head-lr", type=float, default=3e-3)
    p.add_argument("--backbone-lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--feature-cache", default=None)
    p.add_argument("--extra", default="{}", help="JSON of further TrainConfig fields")
    a = p.parse_args(argv)
    if a.full and a.blocks:
        p.error("--full trains every stage: leave --blocks out")
    a.feature_cache = a.feature_cache or str(Path(a.out) / "feature-cache")
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.time()
    study = Study(a)
    results = study.run()
    text = table(results, study.domains)
    (Path(a.out) / "results.md").write_text(text + "\n")
    (Path(a.out) / "results.json").write_text(json.dumps({"settings": vars(a), "results": results}, indent=1))
    print(text)
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
