"""One owner of preprocessing: the model config, timm's inference transform (checked against the
hand-written transform it replaced, on real images), the reference crop option, the transforms a
model hands out, old model directories, file modes, clean decode errors and every data/embed --help."""

from __future__ import annotations

import io
import json
import math
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from uniret.cli import main
from uniret.data import open_items
from uniret.data.images import decode_image
from uniret.embed.model import build_model, load_model
from uniret.embed.preprocess import eval_transform, train_transform
from uniret.errors import ImageDecodeError, UniretError

TINY = "timm:test_vit"


def old_eval_transform(cfg: dict):
    """The hand-written eval transform uniret used before timm's (square input sizes)."""
    h = cfg["input_size"][1]
    crop = float(cfg.get("crop_pct", 1.0) or 1.0)
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[cfg["interpolation"]]
    size = math.floor(h / crop)
    resize = T.Resize((size, size) if cfg.get("crop_mode") == "squash" else size, interpolation=interp)
    return T.Compose([resize, T.CenterCrop((h, h)), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])


def real_images(demo_root, n: int = 6) -> list[Image.Image]:
    """Demo images as stored, plus wide, tall, large and small versions of them."""
    items = open_items(demo_root, domains=["flags", "textures"], splits=["train"])
    base = [decode_image(items.get_image_bytes(i)) for i in range(0, len(items), len(items) // n)][:n]
    out = list(base)
    sizes = [(301, 97), (83, 250), (517, 389), (23, 17)]  # wide, tall, large, smaller than the input
    for k, im in enumerate(base):
        out.append(im.resize(sizes[k % len(sizes)], Image.Resampling.BICUBIC))
        out.append(im.crop((5, 0, 64, 40)))
    return out


@pytest.mark.parametrize("size,crop_pct,mode,interp", [
    (32, 0.875, "center", "bicubic"), (64, 1.0, "center", "bilinear"), (224, 0.9, "center", "bicubic"),
    (48, 0.95, "squash", "bicubic"), (64, 1.0, "squash", "bilinear"),
])
def test_timm_eval_transform_equals_the_old_one(demo_root, size, crop_pct, mode, interp):
    cfg = {"input_size": [3, size, size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
           "interpolation": interp, "crop_pct": crop_pct, "crop_mode": mode}
    new, old = eval_transform(cfg), old_eval_transform(cfg)
    for im in real_images(demo_root):
        assert torch.equal(new(im), old(im)), im.size


def test_model_transforms_come_from_its_config():
    model = build_model(TINY, dim=8, image_size=32, crop_pct=1.0)
    train, evaluate = model.transforms()
    assert model.transforms() is model.transforms()  # built once
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    assert torch.equal(evaluate(im), eval_transform(model.config.preprocess)(im))
    torch.manual_seed(3)
    a = train(im)
    torch.manual_seed(3)
    assert torch.equal(a, train_transform(model.config.preprocess)(im)) and a.shape == (3, 32, 32)


def test_crop_pct_option_is_the_reference_crop(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["model", "init", "--backbone", TINY, "--image-size", "32", "--dim", "8", "--crop-pct", "1.0",
                 "--out", str(out)]) == 0
    model = load_model(out)
    assert model.config.preprocess["crop_pct"] == 1.0
    assert build_model(TINY, dim=8, image_size=32).config.preprocess["crop_pct"] == 0.95  # test_vit's timm default
    # 1.0: the short side becomes the input size and the centre square is kept, nothing else
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, 32:64] = 255
    x = model.transforms()[1](Image.fromarray(wide))
    mean, std = model.config.preprocess["mean"][0], model.config.preprocess["std"][0]
    assert torch.allclose(x[0], torch.full((32, 32), (1 - mean) / std), atol=1e-5)  # all white: no margin
    capsys.readouterr()
    for bad in ("0", "1.5", "-0.2"):
        assert main(["model", "init", "--backbone", TINY, "--crop-pct", bad, "--out", str(tmp_path / "x")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--crop-pct must be in (0, 1]" in err[0]


def test_old_model_directory_with_image_size_still_loads_and_keeps_its_hash(tmp_path):
    """Directories written before preprocess became the one home of the input size carry
    ``image_size``; they load, and their config hash (which their stores record) stays the same."""
    torch.manual_seed(0)
    model = build_model(TINY, dim=8, image_size=32)
    model.save(tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["image_size"] = 32  # as the old format wrote it
    from uniret.utils import stable_hash

    arch = {k: v for k, v in cfg.items() if k not in ("provenance", "config_hash")}
    cfg["config_hash"] = stable_hash({"architecture": arch, "weights": model.weights_digest()})
    cfg_file.write_text(json.dumps(cfg))
    old = load_model(tmp_path / "m")
    assert old.config_hash() == cfg["config_hash"] != model.config_hash()
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    assert torch.equal(old.encode(x), model.encode(x))
    old.save(tmp_path / "again")  # written back as read
    assert load_model(tmp_path / "again").config_hash() == cfg["config_hash"]


def test_model_files_are_world_readable(tmp_path):
    build_model(TINY, dim=8, image_size=32).save(tmp_path / "m")
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


@pytest.mark.parametrize("data,reason", [
    (b"", "not a known image format"),
    (b"just text", "not a known image format"),
    ("truncated-png", "truncated or corrupt PNG"),
])
def test_corrupt_image_messages_are_clean(data, reason):
    if data == "truncated-png":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
        data = buf.getvalue()[:60]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    msg = str(info.value)
    assert msg.startswith("cannot decode image: ") and reason in msg
    assert "object at 0x" not in msg and "\n" not in msg


@pytest.mark.parametrize("command", [["data"], ["data", "check"], ["data", "pack"], ["data", "demo"], ["model"],
                                     ["model", "init"], ["model", "info"], ["embed"]])
def test_help_of_every_data_and_embed_command_renders(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage" in out and "Traceback" not in out


def test_bad_preprocess_config_is_one_line():
    cfg = {"input_size": [3, 8, 8], "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "cubic-ish"}
    with pytest.raises(UniretError, match="unknown interpolation"):
        eval_transform(cfg)
    with pytest.raises(UniretError, match="crop_mode"):
        eval_transform({**cfg, "interpolation": "bilinear", "crop_mode": "zoom"})
