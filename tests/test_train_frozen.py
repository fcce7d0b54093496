"""A frozen part of the backbone (``--freeze-backbone``, ``--train-blocks N``): the cut is exact,
training on cached features gives the losses of training with the frozen part in the loop (same
seed, same views), the frozen weights do not move, and the cache is keyed by content."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from uniret.errors import UniretError
from uniret.train.config import TrainConfig
from uniret.train.trainer import train

TINY = dict(backbone="timm:test_resnet", image_size=32, batch_size=8, dynamic_interval=2, dynamic_window=2,
            log_every=1, val_batch_size=64, head_lr=3e-3, backbone_lr=3e-3, backbone_freeze_fraction=0.0,
            method="uscrr", cache_views=2, cache_dtype="float32", val_every=0, ckpt_every=0)


def run(data, out, **kw):
    values = {**TINY, "data": str(data), "out": str(out), "steps": 5, **kw}
    return train(TrainConfig(**values))


def records(run_dir, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in records(run_dir, "train")]


@pytest.mark.parametrize("blocks", [None, 2])
def test_cut_is_exact(blocks):
    from uniret.embed.backbones import create_backbone
    from uniret.train.frozen import split_backbone

    for name in ("timm:test_resnet", "timm:test_efficientnet"):
        bb = create_backbone(name, image_size=48, pool="gem").eval()
        prefix, rest = split_backbone(bb, blocks)
        x = torch.randn(3, 3, 48, 48)
        assert torch.allclose(rest(prefix(x)), bb(x), atol=1e-5)


def test_train_blocks_out_of_range():
    from uniret.embed.backbones import create_backbone
    from uniret.train.frozen import split_backbone

    with pytest.raises(UniretError, match="has 4 stages"):
        split_backbone(create_backbone("timm:test_resnet"), 9)


@pytest.mark.parametrize("kw", [dict(freeze_backbone=True), dict(train_blocks=1)])
def test_cached_losses_equal_in_loop(demo_root, tmp_path, kw):
    cached = run(demo_root, tmp_path / "cached", feature_cache=str(tmp_path / "cache"), val_every=5, **kw)
    in_loop = run(demo_root, tmp_path / "loop", cache_features=False, val_every=5, **kw)
    a, b = losses(cached), losses(in_loop)
    assert len(a) == 5 and a == pytest.approx(b, rel=1e-4, abs=1e-5)
    # validation on the cached prefix outputs = validation of the whole model
    va, vb = records(cached, "val"), records(in_loop, "val")
    assert [v["step"] for v in va] == [0, 5]
    assert [v["mAP@100"] for v in va] == pytest.approx([v["mAP@100"] for v in vb], abs=1e-6)
    # a different seed picks other views: the losses differ (the comparison above can fail)
    other = run(demo_root, tmp_path / "seed1", feature_cache=str(tmp_path / "cache"), seed=1, **kw)
    assert losses(other) != pytest.approx(a, rel=1e-4)


def test_frozen_weights_do_not_move(demo_root, tmp_path):
    from safetensors.torch import load_file

    from uniret.embed.model import build_model

    torch.manual_seed(0)
    start = build_model("timm:test_resnet", image_size=32).inference_state_dict()
    out = run(demo_root, tmp_path / "r", train_blocks=1, feature_cache=str(tmp_path / "cache"))
    end = load_file(str(out / "model" / "model.safetensors"))
    frozen = [k for k in start if k.startswith("backbone.model.layer1") or k.startswith("backbone.model.conv1")]
    trained = [k for k in start if k.startswith("backbone.model.layer4") and k.endswith("weight")]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
    assert trained and any(not torch.equal(start[k], end[k]) for k in trained)


def test_changed_image_invalidates_its_entry(demo_root, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    cache = tmp_path / "cache"
    run(data, tmp_path / "a", freeze_backbone=True, feature_cache=str(cache), steps=1)
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    before = torch.from_numpy(__import__("numpy").load(entry / "features.npy")).clone()
    caplog.clear()
    with caplog.at_level("INFO", logger="uniret"):
        run(data, tmp_path / "b", freeze_backbone=True, feature_cache=str(cache), steps=1)
    assert "reused" in caplog.text
    # change one train image: only its rows are recomputed, in the same cache entry
    from uniret.data import open_collection

    coll = open_collection(data)
    domain = coll.domains[0]
    record = coll.records(domain, "train")[0]
    path = next(p for p in data.rglob("*") if p.is_file() and p.as_posix().endswith(record.path))
    Image.new("RGB", (40, 40), (255, 0, 0)).save(path)
    caplog.clear()
    with caplog.at_level("INFO", logger="uniret"):
        run(data, tmp_path / "c", freeze_backbone=True, feature_cache=str(cache), steps=1)
    assert "computing 1 of" in caplog.text
    after = torch.from_numpy(__import__("numpy").load(entry / "features.npy"))
    changed = (after != before).flatten(2).any(-1).any(0)
    assert int(changed.sum()) == 1 and bool(changed[0])


def test_options_are_checked(demo_root, tmp_path):
    with pytest.raises(UniretError, match="choose one"):
        run(demo_root, tmp_path / "x", freeze_backbone=True, train_blocks=1)
    with pytest.raises(UniretError, match="cache_views"):
        run(demo_root, tmp_path / "y", freeze_backbone=True, cache_views=0)
