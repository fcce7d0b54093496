"""The standard training knobs of issue #13: learning-rate schedules with warm-up per group (values
at given steps), per-domain augmentation (applied to the right domain's batches only), the time
budget (respected within a step), gradient clipping and the EMA of the exported weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from uniret.train.config import TrainConfig
from uniret.train.optim import GroupSchedule, clip_gradients, make_schedules

TINY = dict(backbone="timm:test_vit", image_size=32, batch_size=8, val_every=0, log_every=1)


def lrs(config: TrainConfig, steps: list[int]) -> dict[str, list[float]]:
    schedules = make_schedules(config)
    return {name: [s(step / config.steps) for step in steps] for name, s in schedules.items()}


def test_cosine_with_warmup_per_group():
    config = TrainConfig(steps=100, head_lr=1.0, backbone_lr=0.1, lr_schedule="cosine", warmup_fraction=0.1,
                         backbone_freeze_fraction=0.2, min_lr_ratio=0.0)
    got = lrs(config, [0, 5, 10, 55, 99, 19, 20, 24, 28, 60])
    heads, backbone = got["heads"], got["backbone"]
    # heads: linear warm-up over the first 10 steps, then a half cosine from 1.0 to 0 over the other 90
    assert heads[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert heads[3] == pytest.approx(0.5, abs=1e-4)  # the middle of the cosine part
    assert heads[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)), abs=1e-4)
    # backbone: frozen for 20 steps, then its own warm-up (10% of its 80 steps) and cosine, at a tenth
    assert backbone[5] == 0.0 and backbone[6] == 0.0
    assert backbone[7] == pytest.approx(0.1 * 4 / 8, abs=1e-6)
    assert backbone[8] == pytest.approx(0.1, abs=1e-6)
    assert backbone[9] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 32 / 72)), abs=1e-5)


def test_step_and_constant_schedules():
    config = TrainConfig(steps=100, head_lr=1.0, backbone_lr=0.5, lr_schedule="step", step_milestones=[0.5, 0.75],
                         step_gamma=0.1, backbone_lr_schedule="constant", backbone_freeze_fraction=0.0)
    got = lrs(config, [0, 49, 50, 74, 75, 99])
    assert got["heads"] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert got["backbone"] == [0.5] * 6  # the reference: constant, exactly the base value
    # the reference default: heads constant, backbone 0 for round(0.2 * steps) steps, then constant
    ref = lrs(TrainConfig(steps=6), [0, 1, 2, 5])
    assert ref["heads"] == [1e-3] * 4 and ref["backbone"] == [0.0, 1e-5, 1e-5, 1e-5]
    assert GroupSchedule(0.0, "cosine", 0.5)(0.7) == 0.0


def test_per_domain_augmentation_reaches_only_its_domain(demo_root):
    """flags mirrored with p=1, every other domain never: each domain's batch against its plain
    (unaugmented) pixels."""
    from uniret.embed.preprocess import eval_transform
    from uniret.train.augment import build_transform, domain_specs
    from uniret.train.data import TrainData, read_image

    pre = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}
    domains = ["flags", "glyphs", "shapes", "textures"]
    full_frame = {"crop": "rrc", "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0}
    specs = domain_specs(full_frame, {"flags": {"hflip": 1.0}}, domains)
    assert [s["hflip"] for s in specs] == [1.0, 0.0, 0.0, 0.0]
    data = TrainData(str(demo_root), domains, {d: build_transform(pre, s) for d, s in zip(domains, specs)})
    plain = eval_transform(pre)
    for d, domain in enumerate(domains):
        images, _ = data.load(d, [0, 1], [3, 4])
        base = data.offsets[d]
        reference = torch.stack([plain(read_image(data.items, base + p)) for p in (0, 1)])
        expected, other = (reference.flip(-1), reference) if domain == "flags" else (reference, reference.flip(-1))
        assert torch.allclose(images, expected, atol=1e-5), domain
        assert not torch.allclose(images, other, atol=1e-5), domain  # the pictures are not symmetric


def test_query_distortions_warp_blur_and_reencode():
    """rotate/translate/blur/jpeg: each off by default, each changes the picture the way it says
    (a warp moves a corner, a blur lowers the high frequencies, JPEG leaves block artefacts), the same
    seed gives the same pixels, and out-of-range values are refused in one line."""
    import numpy as np
    from PIL import Image

    from uniret.errors import UsageError
    from uniret.train.augment import DEFAULT_SPEC, build_transform, check_spec, distortions

    rng = np.random.default_rng(0)
    image = Image.fromarray(np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8))
    assert distortions(DEFAULT_SPEC) == []

    def run(**keys):
        (only,) = distortions({**DEFAULT_SPEC, **keys})
        torch.manual_seed(3)
        return np.asarray(only(image), dtype=np.float64)

    source = np.asarray(image, dtype=np.float64)
    warped = run(rotate=30.0)
    assert warped.shape == source.shape and (warped[0, 0] == 255).all()  # a corner rotated out, filled white
    assert np.array_equal(warped, run(rotate=30.0))  # seeded by torch's RNG
    blurred = run(blur=1.0)
    assert (np.diff(blurred, axis=1) ** 2).mean() < 0.95 * (np.diff(source, axis=1) ** 2).mean()
    coded = run(jpeg=1.0)
    assert 0 < np.abs(coded - source).mean() < 40
    pre = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    full = build_transform(pre, {**DEFAULT_SPEC, "crop": "rrc", "rotate": 10.0, "translate": 0.06, "blur": 0.3,
                                 "jpeg": 0.5})
    assert full(image).shape == (3, 32, 32)
    for bad in ({"rotate": -1}, {"translate": 0.9}, {"blur": 2}, {"jpeg": "yes"}, {"fill": 300}, {"fill": 127.5}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            check_spec(bad)


def test_time_budget_is_respected_within_a_step(demo_root, tmp_path):
    """The run stops at the first step boundary after the budget: the step before ended inside it."""
    from uniret.train.trainer import train

    budget_s = 12.0
    run = train(TrainConfig(data=str(demo_root), out=str(tmp_path / "run"), steps=1, time_budget=budget_s / 60,
                            lr_schedule="cosine", **TINY))
    trains = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in trains if r["kind"] == "train"]
    assert len(trains) > 1  # --steps is ignored under a time budget
    assert trains[-1]["elapsed_s"] >= budget_s > trains[-2]["elapsed_s"]
    assert trains[-1]["lr_heads"] < trains[0]["lr_heads"]  # the cosine stretched to the budget
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == trains[-1]["step"] and summary["train_seconds"] >= budget_s


def test_gradient_clipping_bounds_the_global_norm():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    layer(torch.randn(5, 4)).pow(2).sum().mul(100).backward()
    before = clip_gradients(layer.parameters(), 0.5)
    after = torch.norm(torch.stack([p.grad.norm() for p in layer.parameters()]))
    assert before > 0.5 and after.item() == pytest.approx(0.5, rel=1e-4)
    assert clip_gradients(layer.parameters(), None) is None


def test_ema_weights_are_validated_and_exported(demo_root, tmp_path):
    from uniret.train.rundir import load_checkpoint, unprefixed
    from uniret.train.trainer import train

    run = train(TrainConfig(data=str(demo_root), out=str(tmp_path / "run"), steps=4, ema_decay=0.5,
                            grad_clip_norm=1.0, ckpt_every=4, **TINY))
    tensors, _ = load_checkpoint(run / "checkpoints" / "last.safetensors")
    ema, model = unprefixed("ema", tensors), unprefixed("model", tensors)
    exported = load_file(str(run / "model" / "model.safetensors"))
    assert exported.keys() <= ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert any(not torch.equal(ema[k], model[f"embedder.{k}"]) for k in exported)  # an average, not the last
    trains = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("grad_norm" in r for r in trains if r["kind"] == "train")


def test_channels_last_on_cpu_trains_the_same_model(demo_root, tmp_path):
    """channels_last: true on a CPU (NHWC through oneDNN) is a memory layout, not another model: the same
    seed gives the same losses and exported weights as the default NCHW run, within float tolerance."""
    from uniret.train.trainer import train

    def run(name: str, channels_last: bool | None):
        config = TrainConfig(data=str(demo_root), out=str(tmp_path / name), steps=3, seed=1, ckpt_every=0,
                             **{**TINY, "backbone": "timm:test_resnet"}, channels_last=channels_last, device="cpu")
        out = train(config)
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x)["kind"] == "train"]
        return losses, load_file(out / "model" / "model.safetensors")

    nchw, nhwc = run("nchw", None), run("nhwc", True)
    assert len(nchw[0]) == 3 and nchw[0] == pytest.approx(nhwc[0], rel=1e-4, abs=1e-5)
    assert nchw[1].keys() == nhwc[1].keys()
    for key, value in nchw[1].items():
        assert torch.allclose(value, nhwc[1][key], rtol=1e-3, atol=1e-4), key
    from uniret.errors import UsageError

    with pytest.raises(UsageError, match="channels_last must be true or false"):
        TrainConfig.from_json({"data": str(demo_root), "out": str(tmp_path / "bad"), "channels_last": "yes"})
