"""`uniret train` against bad and hostile input (issue #11): no pickle is ever loaded, a diverging
run stops with the last good checkpoint and no NaN model, every bad value is one line on stderr with
exit 1 or 2 and no traceback, and nothing that was there before is changed."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil

import pytest
import torch

from uniret.cli import main
from uniret.errors import UniretError
from uniret.train.config import TrainConfig
from uniret.train.rundir import load_checkpoint, unprefixed
from uniret.train.trainer import train

TINY = ["--backbone", "timm:test_vit", "--image-size", "32", "--batch-size", "8", "--val-every", "0"]


def cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def one_clean_line(code: int, err: str) -> None:
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def snapshot(path) -> dict:
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(demo_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("hostile") / "run"
    code = main(["train", "--data", str(demo_root), *TINY, "--steps", "2", "--method", "uscrr", "--out", str(run)])
    assert code == 0
    return run


@pytest.mark.parametrize("name", ["last.safetensors", "last.pt"])
def test_resume_never_unpickles_a_planted_checkpoint(finished_run, demo_root, tmp_path, capsys, name):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "pwned"
    if name == "last.pt":  # the old (pickle) name: refused even beside a good new checkpoint
        (run / "checkpoints" / name).write_bytes(pickle.dumps({"model": Payload(marker)}))
    else:
        (run / "checkpoints" / name).write_bytes(pickle.dumps(Payload(marker)))
    before = snapshot(tmp_path)
    code, err = cli(["train", "--data", str(demo_root), *TINY, "--steps", "2", "--method", "uscrr",
                     "--out", str(run), "--resume"], capsys)
    one_clean_line(code, err)
    assert name in err
    assert not marker.exists()  # the payload never ran
    assert snapshot(tmp_path) == before


def test_a_diverging_run_stops_with_the_last_good_checkpoint(demo_root, tmp_path, monkeypatch):
    """From step 3 on the loss is NaN: those steps are not applied, and after max_nonfinite_steps of
    them the run stops with an error, the step-2 checkpoint finite and no model exported."""
    from uniret.train import methods

    real = methods.Uscrr.losses
    calls = {"n": 0}

    def failing(self, out, labels, ctx):
        calls["n"] += 1
        losses = real(self, out, labels, ctx)
        if calls["n"] >= 3:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    monkeypatch.setattr(methods.Uscrr, "losses", failing)
    cfg = TrainConfig(data=str(demo_root), out=str(tmp_path / "run"), method="uscrr", backbone="timm:test_vit",
                      image_size=32, batch_size=8, steps=10, val_every=0, ckpt_every=2, log_every=1,
                      max_nonfinite_steps=3)
    with pytest.raises(UniretError, match="not finite for 3 consecutive steps"):
        train(cfg)
    tensors, state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert state["step"] == 2  # the steps 3-4 boundary was inside the NaN streak: not written
    assert all(torch.isfinite(v).all() for v in unprefixed("model", tensors).values())
    assert not (tmp_path / "run" / "model").exists()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in lines if "loss" in r)
    assert [r["nonfinite_steps"] for r in lines if r["kind"] == "train"][2:] == [1, 1]


def test_bad_values_are_one_line_and_touch_nothing(demo_root, finished_run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cfg = tmp_path / "cfg.json"
    base = ["train", "--data", str(demo_root), *TINY, "--steps", "2"]
    cases = [
        (["--head-lr", "-1", "--out", str(tmp_path / "a")], "head_lr"),
        (["--backbone-lr", "nan", "--out", str(tmp_path / "a")], "backbone_lr"),
        (["--time-budget", "0", "--out", str(tmp_path / "a")], "time_budget"),
        (["--time-budget", "1e308", "--out", str(tmp_path / "a")], "time_budget"),  # a typo, not a plan
        (["--warmup-fraction", "1.5", "--out", str(tmp_path / "a")], "warmup_fraction"),
        (["--seed", "-1", "--out", str(tmp_path / "a")], "seed"),
        (["--seed", str(10**20), "--out", str(tmp_path / "a")], "seed"),  # past int64
        (["--dim", str(10**20), "--out", str(tmp_path / "a")], "dim"),
        (["--batch-size", str(10**20), "--out", str(tmp_path / "a")], "batch_size"),
        (["--augment", "{\"hflip\": 2}", "--out", str(tmp_path / "a")], "hflip"),
        (["--augment", "not json", "--out", str(tmp_path / "a")], "--augment"),
        (["--device", "bogus", "--out", str(tmp_path / "a")], "bogus"),
        (["--resume", "--out", str(tmp_path / "nothing")], "no training run"),
        (["--out", str(foreign)], "not a uniret run"),
        (["--out", str(demo_root)], "inside the input"),
        (["--out", str(demo_root / "info" / "run")], "inside the input"),
        (["--out", str(demo_root.parent)], "contains the input"),
        (["--method", "specialist", "--domain", "nowhere", "--out", str(tmp_path / "a")], "unknown domain"),
        (["--config", str(cfg), "--out", str(tmp_path / "a")], "log_every"),
        (["--config", str(tmp_path), "--out", str(tmp_path / "a")], "config"),
    ]
    for extra, needle in cases:
        cfg.write_text(json.dumps({"log_every": "often"}))
        before = snapshot(demo_root), snapshot(foreign), snapshot(finished_run)
        code, err = cli(base + extra, capsys)
        one_clean_line(code, err)
        assert needle in err, (extra, err)
        assert (snapshot(demo_root), snapshot(foreign), snapshot(finished_run)) == before
        assert not (tmp_path / "a").exists() and not (tmp_path / "nothing").exists()
    for values, needle in [({"head_lr": "fast"}, "head_lr"), ({"nested_dims": 5}, "nested_dims"),
                           ({"val_split": "nope"}, "val_split"), ({"augment_domains": {"mars": {}}}, "mars"),
                           ({"betas": [0.9, 1.5]}, "betas"), ({"augment": {"crop": "zoom"}}, "crop")]:
        cfg.write_text(json.dumps(values))
        code, err = cli(base + ["--config", str(cfg), "--out", str(tmp_path / "b")], capsys)
        one_clean_line(code, err)
        assert needle in err, (values, err)
        shutil.rmtree(tmp_path / "b", ignore_errors=True)


def test_ctrl_c_says_how_to_continue(demo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UNIRET_TEST_INTERRUPT_TRAIN", "1")
    args = ["train", "--data", str(demo_root), *TINY, "--steps", "3", "--ckpt-every", "1", "--out", str(tmp_path / "r")]
    code, err = cli(args, capsys)
    assert code == 130 and "--resume" in err and "Traceback" not in err
    monkeypatch.delenv("UNIRET_TEST_INTERRUPT_TRAIN")
    code, err = cli(args + ["--resume"], capsys)  # what the line says works
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 3


def test_missing_training_image_is_skipped_and_counted(demo_root, tmp_path):
    from uniret.embed.preprocess import train_transform
    from uniret.train.data import TrainData

    root = tmp_path / "missing"
    shutil.copytree(demo_root, root)
    first = json.loads((root / "info" / "shapes" / "train.json").read_text())[0]["path"]
    (root / "images" / first).unlink()
    pre = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    data = TrainData(str(root), ["shapes"], train_transform(pre))
    images, labels = data.load(0, [0, 1], [1, 2])
    assert images.shape == (2, 3, 32, 32) and data.decode_failures == 1
