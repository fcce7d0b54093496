"""ONNX export and runtime: parity with torch for every backbone family the tests use, the numpy
preprocessing against timm's transform, `uniret model export` and its output guard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from uniret.cli import main  # noqa: E402
from uniret.embed.imageprep import ImagePrep  # noqa: E402
from uniret.embed.model import build_model  # noqa: E402
from uniret.embed.onnx import (  # noqa: E402
    GRAPH_NAME,
    OnnxEmbedder,
    check_parity,
    export_graph,
    load_embedder,
    model_graph,
    sample_images,
)
from uniret.embed.preprocess import eval_transform  # noqa: E402
from uniret.errors import UniretError  # noqa: E402


@pytest.fixture(scope="module")
def photos():
    images = sample_images()
    assert len(images) >= 4
    return images


FAMILIES = [
    ("timm:test_resnet", {"image_size": 48}),
    ("timm:test_resnet", {"image_size": 48, "pool": "gem"}),
    ("timm:test_vit", {"image_size": 32}),
    ("open_clip:ViT-S-16", {"image_size": 32}),
]


@pytest.mark.parametrize(("backbone", "options"), FAMILIES, ids=lambda v: str(v))
def test_export_matches_torch_on_real_photos_with_nested_dims(backbone, options, photos):
    torch.manual_seed(0)
    model = build_model(backbone, dim=16, nested_dims=[4, 8], **options).eval()
    embedder = OnnxEmbedder(export_graph(model))
    assert embedder.config_hash() == model.config_hash() and embedder.dims == [4, 8, 16]
    assert check_parity(model, embedder, photos) > 0.9999
    for d in (4, 8, 16):
        ours = embedder.encode(photos, dim=d)
        reference = model.encode(photos, dim=d).numpy()
        assert ours.shape == (len(photos), d)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
        assert (ours * reference).sum(axis=1).min() > 0.9999
    # Real photos give distinct embeddings (a constant output would pass a cosine check).
    full = embedder.encode(photos)
    assert (full @ full.T)[~np.eye(len(photos), dtype=bool)].max() < 0.9999


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    shapes = [(80, 60), (60, 80), (64, 64), (20, 30), (301, 97)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in shapes]


@pytest.mark.parametrize("config", [
    {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic",
     "crop_pct": 0.875, "crop_mode": "center"},
    {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
     "crop_pct": 1.0, "crop_mode": "center"},
    {"input_size": [3, 48, 48], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "squash"},
])
def test_numpy_preprocessing_equals_timm_transform(config):
    prep = ImagePrep(config)
    assert ImagePrep.supports(config)
    images = _images()
    ours = prep(images)
    reference = torch.stack([eval_transform(config)(im) for im in images]).numpy()
    assert ours.shape == reference.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_border_crop_mode_is_left_to_the_torch_transform():
    assert not ImagePrep.supports({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                   "crop_mode": "border"})


def test_model_export_command_writes_a_checked_graph_and_guards_its_output(tmp_path, photos):
    model_dir, out = tmp_path / "model", tmp_path / "m.onnx"
    assert main(["model", "init", "--backbone", "timm:test_resnet", "--image-size", "32", "--dim", "8",
                 "--nested-dims", "4", "--out", str(model_dir)]) == 0
    assert main(["model", "export", str(model_dir), "--format", "onnx", "--out", str(out)]) == 0
    record = json.loads((tmp_path / "m.onnx.json").read_text())
    assert record["format"].startswith("uniret-onnx") and record["nested_dims"] == [4, 8]
    assert record["preprocess"]["input_size"] == [3, 32, 32] and record["parity_cosine"] > 0.9999
    embedder = OnnxEmbedder(out)
    from uniret.embed.model import load_model

    model = load_model(model_dir)
    assert record["config_hash"] == embedder.config_hash() == model.config_hash()
    for n in (1, 7):  # the batch is dynamic
        batch = embedder.preprocess(photos[:1] * n)
        assert embedder.run(batch).shape == (n, 8)
    before = out.read_bytes()
    assert main(["model", "export", str(model_dir), "--format", "onnx", "--out", str(out)]) == 1  # no --overwrite
    assert main(["model", "export", str(model_dir), "--format", "onnx", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() == before  # the same model exports to the same graph
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("mine")
    assert main(["model", "export", str(model_dir), "--format", "onnx", "--out", str(foreign), "--overwrite"]) == 1
    assert foreign.read_text() == "mine"
    (tmp_path / "other.onnx.json").write_text("{}")  # someone else's file where the record would go
    assert main(["model", "export", str(model_dir), "--format", "onnx", "--out", str(tmp_path / "other.onnx")]) == 1
    assert not (tmp_path / "other.onnx").exists() and (tmp_path / "other.onnx.json").read_text() == "{}"
    assert main(["model", "export", str(model_dir), "--format", "onnx", "--out", str(tmp_path / "m.txt")]) == 2


def test_a_model_directory_graph_serves_without_the_torch_weights(tmp_path, photos):
    from uniret.embed.onnx import save_graph

    torch.manual_seed(0)
    model = build_model("timm:test_resnet", dim=8, image_size=32)
    model.save(tmp_path / "model")
    reference = model.encode(photos).numpy()
    assert save_graph(model, tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()  # only the graph is left to run
    assert model_graph(tmp_path / "model") == tmp_path / "model" / GRAPH_NAME
    embedder = load_embedder(tmp_path / "model", "onnx", "cpu")
    assert isinstance(embedder, OnnxEmbedder)
    assert (embedder.encode(photos) * reference).sum(axis=1).min() > 0.9999
    with pytest.raises(UniretError, match="missing"):
        load_embedder(tmp_path / "model", "torch", "cpu")
