"""The training loop end to end on the demo collection with a tiny model: run directory, methods,
exact resume, the CLI and its error paths, and 1 process vs 2 gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from uniret.cli import main
from uniret.train.config import TrainConfig
from uniret.train.rundir import load_checkpoint, unprefixed
from uniret.train.trainer import train

TINY = dict(backbone="timm:test_vit", image_size=32, batch_size=8, dynamic_interval=2, dynamic_window=2,
            log_every=1, val_batch_size=64)


def tiny_config(data, out, **kw) -> TrainConfig:
    values = {**TINY, "data": str(data), "out": str(out), "steps": 6, "val_every": 3, "ckpt_every": 2}
    values.update(kw)
    return TrainConfig(**values)


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint(run, name="last") -> tuple[dict, dict]:
    """(model tensors, state) of RUN/checkpoints/<name>.safetensors."""
    tensors, state = load_checkpoint(run / "checkpoints" / f"{name}.safetensors")
    return unprefixed("model", tensors) if name == "last" else tensors, state


def test_run_directory_and_export(demo_root, tmp_path):
    from uniret.embed.model import load_model

    run = train(tiny_config(demo_root, tmp_path / "run"))
    header = json.loads((run / "train_config.json").read_text())
    assert header["config"]["method"] == "udon" and header["domains"] == ["flags", "glyphs", "shapes", "textures"]
    assert "git_commit" in header
    assert (run / "checkpoints" / "last.safetensors").is_file() and (run / "checkpoints" / "best.safetensors").is_file()
    lines = metrics(run)
    vals = [r for r in lines if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [0, 3, 6]  # untrained, every 3 steps, last
    trains = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [1, 2, 3, 4, 5, 6]
    assert {"cls_teacher", "cls_student", "logit", "relational", "probabilities"} <= set(trains[0])
    # round-robin until every domain has a loss (interval 2 < 4 domains: the first update comes after
    # step 4, reported by the sampler as an event and logged at once)
    sampler = [r for r in lines if r["kind"] == "sampler"]
    assert sampler and sampler[0]["first_step"] == 4 and sampler[0]["step"] == 4
    assert trains[2]["probabilities"] == {"flags": 0.25, "glyphs": 0.25, "shapes": 0.25, "textures": 0.25}
    assert list(trains[3]["probabilities"].values()) == pytest.approx(sampler[0]["probabilities"])
    assert sum(sampler[0]["probabilities"]) == pytest.approx(1.0)
    summary = json.loads((run / "summary.json").read_text())
    best = max(vals, key=lambda v: v["R@1"])
    assert summary["best_val_R@1"] == pytest.approx(best["R@1"])
    model = load_model(run)
    assert model.config.dim == 64
    assert model.config.provenance["training"]["method"] == "udon"
    # the exported weights are the best checkpoint's
    best_state, best_meta = checkpoint(run, "best")
    assert best_meta["step"] == best["step"]
    exported = weights(run)
    assert all(torch.equal(exported[k], best_state[k]) for k in exported)


def interrupted(cfg, step: int, monkeypatch) -> None:
    """Run until a simulated Ctrl-C (the test seam) before ``step``."""
    monkeypatch.setenv("UNIRET_TEST_INTERRUPT_TRAIN", str(step))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.delenv("UNIRET_TEST_INTERRUPT_TRAIN")


def test_resume_equals_uninterrupted(demo_root, tmp_path, monkeypatch):
    whole = train(tiny_config(demo_root, tmp_path / "whole", val_every=0))
    cfg = tiny_config(demo_root, tmp_path / "cut", val_every=0)
    interrupted(cfg, 5, monkeypatch)  # dies after step 5; the last checkpoint is step 4
    assert not (tmp_path / "cut" / "model").exists()
    assert checkpoint(tmp_path / "cut")[1]["step"] == 4
    resumed = train(cfg, resume=True)
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log continues without the lost step-5 line twice
    assert [r["step"] for r in metrics(resumed)] == [r["step"] for r in metrics(whole)]
    (full, full_state), (cont, cont_state) = checkpoint(whole), checkpoint(resumed)
    assert full_state["sampler"] == cont_state["sampler"]
    assert full_state["optimizer"] == cont_state["optimizer"]
    for k, v in full.items():  # teachers and classifiers too
        assert torch.equal(v, cont[k]), k


@pytest.mark.parametrize("method,extra,sampler", [
    ("uscrr", {}, "round_robin"), ("ujc", {}, "size"),  # the papers' samplers are the methods' defaults
    ("specialist", {"domain": "shapes", "sampler": "uniform"}, "uniform"),  # an explicit --sampler wins
])
def test_baseline_methods(demo_root, tmp_path, method, extra, sampler):
    run = train(tiny_config(demo_root, tmp_path / method, method=method, steps=3, val_every=3, **extra))
    lines = metrics(run)
    trains = [r for r in lines if r["kind"] == "train"]
    assert "cls_teacher" not in trains[0] and "cls_student" in trains[0]
    header = json.loads((run / "train_config.json").read_text())
    assert header["config"]["sampler"] == sampler
    if method == "specialist":
        assert header["domains"] == ["shapes"]
        assert set(lines[0]["per_domain_R@1"]) == {"shapes"}
    if method == "ujc":
        state = checkpoint(run)[0]
        assert state["heads.student_classifiers.0.weight"].shape[0] == sum(header["num_classes"])


@pytest.mark.parametrize("policy", ["skip", "update"])
def test_absent_heads_policy(demo_root, tmp_path, policy, monkeypatch):
    """Step 1 trains flags, step 2 glyphs: flags' heads stay put under "skip" and keep moving on their
    Adam moments under "update" (the reference optimiser's behaviour)."""
    cfg = tiny_config(demo_root, tmp_path / policy, sampler="round_robin", steps=2, val_every=0, ckpt_every=1,
                      absent_heads=policy)
    interrupted(cfg, 1, monkeypatch)
    after_1, state_1 = checkpoint(tmp_path / policy)
    train(cfg, resume=True)
    after_2, state_2 = checkpoint(tmp_path / policy)
    assert state_1["step"] == 1 and state_2["step"] == 2
    for name in ("heads.teacher_heads.0.weight", "heads.teacher_classifiers.0.weight",
                 "heads.student_classifiers.0.weight"):
        same = torch.equal(after_1[name], after_2[name])
        assert same == (policy == "skip"), name
    # glyphs (domain 1) trained in step 2 under both policies
    glyphs = "heads.student_classifiers.1.weight"
    assert not torch.equal(after_1[glyphs], after_2[glyphs])


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_cli_trains_and_rejects_bad_options(demo_root, tmp_path, capsys):
    out = tmp_path / "cli"
    base = ["train", "--data", str(demo_root), "--backbone", "timm:test_vit", "--image-size", "32",
            "--batch-size", "8", "--steps", "2", "--val-every", "0", "--out", str(out)]
    model_options = ["--dim", "32", "--nested-dims", "16", "--pool", "avg", "--crop-pct", "1.0"]  # as `model init`
    code, err = run_cli(base + ["--method", "uscrr", "--sampler", "round_robin", *model_options], capsys)
    assert code == 0, err
    exported = json.loads((out / "model" / "config.json").read_text())
    assert (exported["dim"], exported["nested_dims"], exported["pool"]) == (32, [16, 32], "avg")
    assert exported["preprocess"]["crop_pct"] == 1.0 and exported["preprocess"]["input_size"] == [3, 32, 32]
    for extra, needle in [
        (["--method", "uscrr"], "already holds a run"),
        (["--method", "specialist"], "--domain"),
        (["--method", "uscrr", "--domain", "flags"], "--domain is only for"),
        (["--method", "specialist", "--domain", "nowhere"], "unknown domain"),
        (["--batch-size", "1"], "batch_size"),
        (["--crop-pct", "1.5"], "crop_pct"),
    ]:
        args = base + extra
        if needle != "already holds a run":
            args[args.index("--out") + 1] = str(tmp_path / "bad")
        code, err = run_cli(args, capsys)
        assert code != 0 and needle in err, (extra, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # --method and --sampler are choices read from the registries: typer refuses other values
    for option, value in (("--method", "nope"), ("--sampler", "sometimes")):
        code, err = run_cli(base[:-1] + [str(tmp_path / "bad"), option, value], capsys)
        assert code == 2 and f"Invalid value for '{option}'" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"cls_scale": 8.0, "no_such_option": 1}))
    code, err = run_cli(base[:-1] + [str(tmp_path / "c2"), "--config", str(cfg)], capsys)
    assert code == 2 and "no_such_option" in err
    cfg.write_text(json.dumps({"cls_scale": 8.0, "steps": 99}))
    code, err = run_cli(base[:-1] + [str(tmp_path / "c3"), "--config", str(cfg)], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "c3" / "train_config.json").read_text())["config"]
    assert saved["cls_scale"] == 8.0 and saved["steps"] == 2  # explicit options beat the file


def torchrun(nproc: int, args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "uniret.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_gloo_processes_match_one(demo_root, tmp_path):
    args = ["train", "--data", str(demo_root), "--backbone", "timm:test_vit", "--image-size", "32",
            "--batch-size", "8", "--steps", "4", "--val-every", "0", "--method", "udon", "--sampler", "dynamic",
            "--device", "cpu"]
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"dynamic_interval": 2, "dynamic_window": 2}))
    one = torchrun(1, args + ["--config", str(cfg), "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(2, args + ["--config", str(cfg), "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["world_size"] == 2
    la = [r for r in metrics(tmp_path / "one") if r["kind"] == "sampler"]
    lb = [r for r in metrics(tmp_path / "two") if r["kind"] == "sampler"]
    assert len(la) == len(lb) == 1  # the update after step 4 (interval 2, 4 domains)
    assert la[0]["probabilities"] == pytest.approx(lb[0]["probabilities"], rel=1e-4)
    ta = [r["loss"] for r in metrics(tmp_path / "one") if r["kind"] == "train"]
    tb = [r["loss"] for r in metrics(tmp_path / "two") if r["kind"] == "train"]
    assert ta == pytest.approx(tb, rel=1e-4)


@pytest.mark.slow
def test_demo_recipe_learns(tmp_path):
    """Acceptance: the demo recipe lowers the losses and lifts merged val R@1 well above untrained."""
    from uniret.data.demo import make_demo
    from uniret.train import demo_config

    root = make_demo(tmp_path / "demo", seed=0, scale=1.0) and tmp_path / "demo"
    run = train(demo_config(root, tmp_path / "run"))
    lines = metrics(run)
    vals = [r["R@1"] for r in lines if r["kind"] == "val"]
    trains = [r for r in lines if r["kind"] == "train"]
    assert max(vals[1:]) > vals[0] + 0.25, vals
    for name in ("cls_teacher", "cls_student", "logit", "loss"):
        assert trains[-1][name] < 0.5 * trains[0][name], name
    # The relational loss starts near 0 (random-init embeddings are all alike, so S_u ~ S_t ~ 1);
    # it rises while the heads spread the classes, then falls again.
    peak = max(r["relational"] for r in trains)
    assert trains[-1]["relational"] < peak
