"""Backbone factory, UniversalEmbedder, Matryoshka prefixes, model directories and preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from uniret.cli import main
from uniret.embed.backbones import GeM, create_backbone
from uniret.embed.model import UniversalEmbedder, build_model, load_model
from uniret.embed.preprocess import eval_transform, train_transform
from uniret.errors import UniretError

TINY = "timm:vit_tiny_patch16_224"


def ramp(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.linspace(-1, 1, n * 3 * size * size).reshape(n, 3, size, size)


@pytest.fixture(scope="module")
def tiny_model() -> UniversalEmbedder:
    torch.manual_seed(0)
    return build_model(TINY, dim=8, nested_dims=[2, 4], image_size=32)


# -- factory ---------------------------------------------------------------------------------------
def test_timm_vit_feature_is_cls_token_after_final_norm():
    bb = create_backbone(TINY, image_size=32)
    assert bb.feature_dim == 192
    assert bb.data_config["input_size"] == [3, 32, 32]
    x = ramp()
    with torch.no_grad():
        tokens = bb.model.forward_features(x)  # timm applies the final norm here
        assert torch.allclose(bb(x), tokens[:, 0], atol=1e-6)


def test_timm_cnn_gem_pooling_learnable_and_fixed():
    bb = create_backbone("timm:resnet18", image_size=48, pool="gem")
    assert bb.feature_dim == 512 and bb.data_config["input_size"] == [3, 48, 48]
    assert isinstance(bb.pool, GeM) and any(n == "pool.p" for n, _ in bb.named_parameters())
    x = ramp(2, 48)
    with torch.no_grad():
        fmap = bb.model.forward_features(x)
        expected = fmap.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1 / 3.0)
        assert torch.allclose(bb(x), expected, atol=1e-5)
    fixed = create_backbone("timm:resnet18", pool="gem:4.6")
    assert "pool.p" not in dict(fixed.named_parameters()) and float(fixed.pool.p) == pytest.approx(4.6)
    with pytest.raises(UniretError, match="gem pooling needs a CNN"):
        create_backbone(TINY, image_size=32, pool="gem")


def test_open_clip_small_vit_feature_before_projection():
    bb = create_backbone("open_clip:ViT-S-16", image_size=32)
    assert bb.model.proj is None  # CLIP's output projection is not part of the feature
    assert bb.feature_dim == 384 and bb(ramp()).shape == (2, 384)
    assert bb.data_config["input_size"] == [3, 32, 32]
    assert bb.data_config["mean"][0] == pytest.approx(0.48145466)  # CLIP's own normalisation


def test_open_clip_vit_b16_feature_is_768d():
    bb = create_backbone("open_clip:ViT-B-16/openai", image_size=32)  # arch only: random weights
    assert bb.feature_dim == 768
    with torch.no_grad():
        assert bb(ramp(1)).shape == (1, 768)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("timm:vit_smal_patch16_224", "close matches: vit_small_patch16_224"),
        ("open_clip:ViT-B-17", "close matches: ViT-B-16"),
        ("open_clip:ViT-B-16/nope", "known: openai"),
        ("vit_small_patch16_224", "did you mean timm:vit_small_patch16_224"),
        ("hf:whatever", "source prefix"),
    ],
)
def test_unknown_names_suggest_fixes(name, expected):
    with pytest.raises(UniretError, match=expected):
        create_backbone(name)


def test_cli_unknown_backbone_is_one_line(tmp_path, capsys):
    assert main(["model", "init", "--backbone", "timm:resnet5O", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown timm model") and "resnet50" in err[0]
    assert not (tmp_path / "m").exists()


# -- the model -------------------------------------------------------------------------------------
def test_golden_embeddings_of_seeded_random_init(tiny_model):
    # Regression values for torch.manual_seed(0) + timm vit_tiny at 32 px + 8-d head (LeCun-normal
    # head init since issue 10; the values before it came from PyTorch's default init).
    golden = [
        [0.78805470, 0.31624168, -0.21881063, -0.30583635, 0.18623090, -0.16352506, -0.20046179, 0.18957749],
        [-0.63806289, 0.10671211, 0.18148066, 0.63951492, 0.08627527, -0.19620144, 0.26029837, -0.16087276],
    ]
    torch.manual_seed(0)
    model = build_model(TINY, dim=8, image_size=32)
    z = model.encode(ramp())
    assert z.dtype == torch.float32
    np.testing.assert_allclose(z.numpy(), np.array(golden), atol=2e-5)


def test_features_forward_and_matryoshka_prefixes(tiny_model):
    x = ramp(3)
    with torch.no_grad():
        e_b = tiny_model.features(x)
        raw = tiny_model.backbone(x)
        assert torch.allclose(e_b, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)
        expected = F.normalize(tiny_model.head(e_b), dim=1)
        assert torch.allclose(tiny_model(x), expected, atol=1e-6)
    assert tiny_model.dims == [2, 4, 8]
    full = tiny_model.encode(x)
    assert torch.allclose(full.norm(dim=1), torch.ones(3), atol=1e-6)
    for d in (2, 4):
        prefix = tiny_model.encode(x, dim=d)
        assert prefix.shape == (3, d)
        assert torch.allclose(prefix, F.normalize(full[:, :d], dim=1), atol=1e-6)
    with pytest.raises(UniretError, match="choose one of"):
        tiny_model.encode(x, dim=3)


def test_encode_pil_images_uses_the_stored_preprocessing(tiny_model):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    tf = eval_transform(tiny_model.config)
    by_tensor = tiny_model.encode(torch.stack([tf(im) for im in images]))
    assert torch.allclose(tiny_model.encode(images, batch_size=2), by_tensor, atol=1e-6)


def test_nested_dims_validation():
    with pytest.raises(UniretError, match="must lie in"):
        build_model(TINY, dim=8, nested_dims=[4, 16], image_size=32)
    assert build_model(TINY, dim=8, nested_dims=[4], image_size=32).config.nested_dims == [4, 8]


# -- model directories ------------------------------------------------------------------------------
def test_save_load_round_trip(tiny_model, tmp_path):
    from safetensors import safe_open

    tiny_model.teacher_heads = torch.nn.ModuleList([torch.nn.Linear(192, 16)])  # training-only parts
    try:
        tiny_model.save(tmp_path / "m", provenance={"run": "test"})
    finally:
        del tiny_model.teacher_heads
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["backbone"] == TINY and cfg["dim"] == 8 and cfg["nested_dims"] == [2, 4, 8]
    assert cfg["preprocess"]["input_size"] == [3, 32, 32] and "image_size" not in cfg  # one home: preprocess
    assert cfg["provenance"] == {"run": "test"} and cfg["config_hash"] == tiny_model.config_hash()
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith(("backbone.", "head.")) for k in keys)
    loaded = load_model(tmp_path / "m")
    assert loaded.config_hash() == tiny_model.config_hash()
    x = ramp()
    assert torch.equal(loaded.encode(x), tiny_model.encode(x))
    assert not list(tmp_path.glob(".m.tmp*"))  # the temporary directory was renamed into place


def test_config_hash_changes_with_weights(tiny_model):
    other = build_model(TINY, dim=8, nested_dims=[2, 4], image_size=32)
    assert other.config_hash() != tiny_model.config_hash()


def test_model_directory_as_backbone(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    model = build_model(str(tmp_path / "m"), dim=16)
    assert model.config.backbone == TINY and model.config.preprocess["input_size"] == [3, 32, 32]
    for (k, v), (k2, v2) in zip(model.backbone.state_dict().items(), tiny_model.backbone.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_load_errors(tmp_path):
    with pytest.raises(UniretError, match="no such model directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(UniretError, match="model.safetensors is missing"):
        load_model(tmp_path / "m")


def test_cli_model_init_and_info(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["model", "init", "--backbone", TINY, "--dim", "16", "--nested-dims", "4,8",
                 "--image-size", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["model", "info", str(out), "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["dim"] == 16 and row["nested_dims"] == [4, 8, 16] and row["input_size"] == "32x32"
    assert row["config_hash"] == load_model(out).config_hash()


# -- preprocessing ----------------------------------------------------------------------------------
def test_eval_transform_hand_computed():
    cfg = {"input_size": [3, 8, 8], "mean": [0.5, 0.25, 0.0], "std": [0.5, 0.25, 1.0],
           "interpolation": "bilinear", "crop_pct": 0.5, "crop_mode": "center"}
    im = Image.new("RGB", (30, 20), (255, 0, 51))
    x = eval_transform(cfg)(im)
    assert x.shape == (3, 8, 8)
    # (v/255 - mean) / std per channel
    assert torch.allclose(x[0], torch.full((8, 8), 1.0)) and torch.allclose(x[1], torch.full((8, 8), -1.0))
    assert torch.allclose(x[2], torch.full((8, 8), 0.2), atol=1e-6)
    # crop_pct 0.5: short side resized to 16 then centre 8x8 crop -> the middle half of a gradient
    grad = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3)))
    row = eval_transform({**cfg, "mean": [0, 0, 0], "std": [1, 1, 1]})(grad)[0, 0] * 255
    assert row.tolist() == pytest.approx([64 + 16 * i for i in range(8)], abs=1)


def test_train_transform_random_crop_and_flip():
    cfg = {"input_size": [3, 14, 14], "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear"}
    torch.manual_seed(0)
    tf = train_transform(cfg)
    outs = [tf(Image.new("RGB", (50, 30), (255, 255, 255))) for _ in range(3)]
    assert all(o.shape == (3, 14, 14) for o in outs)
    assert torch.allclose(outs[0], torch.ones(3, 14, 14))


def test_weights_file_loads_into_the_backbone(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32)  # with its classifier, as published
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_model(TINY, dim=8, image_size=32, weights=tmp_path / "w.safetensors")
    assert torch.equal(model.backbone.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.config.provenance["init"]["weights"].endswith("w.safetensors")
    with pytest.raises(UniretError, match="no such file"):
        build_model(TINY, weights=tmp_path / "missing.pth")


@pytest.mark.gpu
def test_gpu_made_model_gives_the_same_embeddings_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY, dim=8, image_size=32).to("cuda")
    x = ramp()
    on_gpu = model.encode(x).cpu()
    model.save(tmp_path / "m")
    on_cpu = load_model(tmp_path / "m", device="cpu").encode(x)
    assert torch.allclose(on_cpu, on_gpu, atol=1e-4)


# -- the head's initialisation ----------------------------------------------------------------------
def test_head_starts_lecun_normal_with_zero_bias():
    torch.manual_seed(0)
    model = build_model("timm:resnet18", dim=256)  # feature_dim 512: enough weights for the statistics
    w, fan_in = model.head.weight.detach(), model.head.weight.shape[1]
    assert torch.count_nonzero(model.head.bias) == 0
    assert abs(w.std().item() * fan_in ** 0.5 - 1) < 0.02  # variance 1/fan_in
    limit = 2 * fan_in ** -0.5 / 0.87962566103423978
    assert w.abs().max().item() <= limit and w.abs().max().item() > 0.95 * limit  # truncated at 2 std
    # Unrelated features stay unrelated: no offset shared by every embedding (PyTorch's default
    # uniform bias gives a mean pairwise cosine near 0.5).
    e_b = F.normalize(torch.randn(400, fan_in), dim=-1)
    with torch.no_grad():
        z = model.embed_features(e_b)
        cos = (z @ z.T)[~torch.eye(400, dtype=torch.bool)].mean().item()
        default = torch.nn.Linear(fan_in, 256)
        biased = F.normalize(default(e_b), dim=-1)
        cos_default = (biased @ biased.T)[~torch.eye(400, dtype=torch.bool)].mean().item()
    assert abs(cos) < 0.02 and cos_default > 0.3, (cos, cos_default)


def test_timm_model_with_a_conv_head_reports_its_output_size():
    """LCNet (like MobileNetV3/V4) puts a 1x1 conv head after pooling: the embedding head must take
    its output size (head_hidden_size), not the trunk's num_features."""
    import torch

    from uniret.embed.model import build_model

    model = build_model("timm:lcnet_050", dim=8, image_size=32)
    assert model.config.feature_dim == 1280
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 8)
