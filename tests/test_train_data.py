"""Training batches: deterministic per-image augmentation (any worker count, any source), the
reference augmentation sizes, LMDB input, and the CUDA path when a GPU is visible."""

from __future__ import annotations

import json

import pytest
import torch

from uniret.embed.preprocess import train_transform
from uniret.train.data import TrainData, sample_seed

PRE = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}


def test_batches_are_deterministic_across_workers(demo_root):
    local = TrainData(str(demo_root), None, train_transform(PRE), workers=0)
    pooled = TrainData(str(demo_root), None, train_transform(PRE), workers=2)
    try:
        assert local.domains == ["flags", "glyphs", "shapes", "textures"]
        positions = [0, 3, 5, 1]
        seeds = [sample_seed(0, 7, slot) for slot in range(4)]
        a_img, a_lab = local.load(2, positions, seeds)
        b_img, b_lab = pooled.load(2, positions, seeds)
        assert a_img.shape == (4, 3, 32, 32)
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
        # labels are the records' class ids
        records = local.collection.records("shapes", "train")
        assert a_lab.tolist() == [records[p].class_id for p in positions]
        # another step's seeds give another crop/flip of the same images
        c_img, _ = local.load(2, positions, [sample_seed(0, 8, slot) for slot in range(4)])
        assert not torch.equal(a_img, c_img)
        assert local.num_classes == [local.collection.num_classes(d, "train") for d in local.domains]
    finally:
        pooled.close()


def test_specialist_domain_and_lmdb_source(demo_lmdb):
    data = TrainData(str(demo_lmdb), ["glyphs"], train_transform(PRE))
    assert data.domains == ["glyphs"] and len(data.sizes) == 1
    images, labels = data.load(0, [0, 1], [1, 2])
    assert images.shape == (2, 3, 32, 32) and labels.dtype == torch.int64


def test_unreadable_image_is_replaced_and_counted(demo_root, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(demo_root, root)
    first = json.loads((root / "info" / "textures" / "train.json").read_text())[0]["path"]
    (root / "images" / first).write_bytes(b"not an image")
    data = TrainData(str(root), ["textures"], train_transform(PRE))
    images, labels = data.load(0, [0], [5])
    assert data.decode_failures == 1
    assert labels.tolist() == [data.labels[0][1]]  # the next record stands in


@pytest.mark.gpu
def test_cuda_bf16_training_exports_cpu_loadable_model(demo_root, tmp_path):
    from uniret.embed.model import load_model
    from uniret.train.config import TrainConfig
    from uniret.train.trainer import train

    cfg = TrainConfig(data=str(demo_root), out=str(tmp_path / "gpu"), backbone="timm:test_vit", image_size=32,
                      batch_size=8, steps=4, val_every=2, device="cuda", dynamic_interval=2, dynamic_window=2)
    run = train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines if r["kind"] == "train")
    assert load_model(run).encode(torch.zeros(1, 3, 32, 32)).shape == (1, 64)
