"""The universal embedding model and its portable directory format.

``UniversalEmbedder`` = backbone + one linear head (METHOD.md §3): ``features(x)`` is e_b =
normalize(backbone(x)), ``forward(x)`` is the universal embedding normalize(head(e_b)). The head
starts as the reference's: LeCun-normal weights (timm's ``lecun_normal_``, flax's default), zero bias. With
Matryoshka nesting (``nested_dims``), every listed prefix, re-normalised, is a usable embedding.

A model directory holds ``config.json`` (backbone name, dims, preprocessing, provenance) and
``model.safetensors`` with the inference weights only (backbone + head; no teachers or
classifiers). Loading rebuilds the architecture from the name with random weights and loads the
tensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import lecun_normal_
from torch import nn

from ..errors import UniretError
from ..guards import has_format
from ..utils import atomic_write_json, make_readable, publish_dir, read_json, scratch_dir, stable_hash
from .backbones import SOURCES, Backbone, create_backbone
from .sizes import EmbeddingSizes

logger = logging.getLogger("uniret")

FORMAT = "uniret-model/1"
#: The universal head: ``linear`` (trained, or random until `uniret train`), ``none`` (the backbone's
#: pooled, L2-normalised features, any width) or ``pca`` (PCA-whitening fitted on images, a linear layer).
HEADS = ("linear", "none", "pca")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_FIELDS = ("image_size",)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model and preprocess its input.

    ``preprocess`` (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``)
    is the only record of the input size: the backbone is rebuilt at ``input_size``.
    """

    backbone: str
    dim: int = 64
    nested_dims: list[int] | None = None
    feature_dim: int = 0
    pool: str | None = None
    head: str = "linear"
    preprocess: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    format: str = FORMAT
    #: Fields that directories written before the preprocess config became the one home of the
    #: input size also carry (``image_size``). Kept as read and written back, because those
    #: directories' config hashes (and so their stores and indexes) cover them; never set otherwise.
    legacy: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        if d["head"] == "linear":
            del d["head"]  # absent = linear: directories written before heads had a choice keep their hash
        return {**d.pop("legacy"), **d}

    def architecture(self) -> dict:
        """The fields that define the computation (not where the model came from)."""
        d = self.to_json()
        d.pop("provenance")
        return d

    def backbone_image_size(self) -> int | None:
        """The ``image_size`` the backbone is rebuilt with: the preprocess config's input size (legacy
        directories: the image_size they recorded). None (the backbone's default) for a non-square
        input size, which only a backbone's own default can be (``--image-size`` is square)."""
        if "image_size" in self.legacy:
            return self.legacy["image_size"]
        _, h, w = self.preprocess["input_size"]
        return int(h) if h == w else None

    @staticmethod
    def from_json(obj: dict, where: str = "config.json") -> ModelConfig:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise UniretError(f"{where}: unknown model format {found!r} (expected {FORMAT})")
        problem = _config_problem(obj)
        if problem:
            raise UniretError(f"{where}: {problem}; the model directory is damaged, re-create it")
        known = set(ModelConfig.__dataclass_fields__) - {"legacy"}
        return ModelConfig(**{k: v for k, v in obj.items() if k in known},
                           legacy={k: obj[k] for k in LEGACY_FIELDS if k in obj})


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _config_problem(obj: dict) -> str | None:
    """What is wrong with a config.json's fields (types and ranges), or None: a tampered config is a
    one-line error here rather than a traceback deep inside timm or torch."""
    pre = obj.get("preprocess")
    checks = [
        (isinstance(obj.get("backbone"), str) and obj["backbone"], "backbone must be a name"),
        (_is_int(obj.get("dim"), 1, 65_536), "dim must be an integer in 1..65536"),
        (obj.get("nested_dims") is None or (isinstance(obj["nested_dims"], list)
                                             and all(_is_int(d, 1, 65_536) for d in obj["nested_dims"])),
         "nested_dims must be a list of sizes"),
        (_is_int(obj.get("feature_dim", 0), 0, 1 << 20), "feature_dim must be an integer"),
        (obj.get("pool") is None or isinstance(obj["pool"], str), "pool must be a name"),
        (obj.get("head", "linear") in HEADS, f"head must be one of {', '.join(HEADS)}"),
        (obj.get("head") != "none" or obj.get("dim") == obj.get("feature_dim"), "a head 'none' model's dim is its feature_dim"),
        (obj.get("image_size") is None or _is_int(obj["image_size"], 1, 4096), "image_size must be 1..4096"),
        (isinstance(pre, dict), "preprocess must be an object"),
        (isinstance(obj.get("provenance", {}), dict), "provenance must be an object"),
    ]
    if isinstance(pre, dict):
        size, mean, std = pre.get("input_size"), pre.get("mean"), pre.get("std")
        checks += [
            (isinstance(size, list) and len(size) == 3 and all(_is_int(v, 1, 4096) for v in size),
             "preprocess.input_size must be [channels, height, width] with sides up to 4096"),
            (isinstance(mean, list) and len(mean) == 3 and all(_is_number(v) for v in mean),
             "preprocess.mean must be three numbers"),
            (isinstance(std, list) and len(std) == 3 and all(_is_number(v) and v > 0 for v in std),
             "preprocess.std must be three positive numbers"),
            (pre.get("crop_pct") is None or (_is_number(pre["crop_pct"]) and 0 < pre["crop_pct"] <= 4),
             "preprocess.crop_pct must be a number in (0, 4]"),
            (all(pre.get(k) is None or isinstance(pre[k], str) for k in ("interpolation", "crop_mode")),
             "preprocess.interpolation and crop_mode must be names"),
        ]
    return next((message for ok, message in checks if not ok), None)


def check_nested_dims(dim: int, nested_dims) -> list[int] | None:
    """Sorted, unique prefix sizes ending at ``dim``; None when there is no nesting."""
    if dim <= 0:
        raise UniretError(f"--dim must be positive, not {dim}")
    if not nested_dims:
        return None
    dims = sorted({int(d) for d in nested_dims})
    if dims[0] <= 0 or dims[-1] > dim:
        raise UniretError(f"--nested-dims {dims} must lie in 1..{dim} (the embedding size)")
    if dims[-1] != dim:
        dims.append(dim)
    return dims


class UniversalEmbedder(nn.Module, EmbeddingSizes):
    """Backbone + universal head; see the module docstring."""

    def __init__(self, backbone: Backbone, config: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.source_dir: Path | None = None  # where it was loaded from, if it was
        if config.head == "none":  # e_b itself is the embedding
            self.head = nn.Identity()
        else:
            self.head = nn.Linear(backbone.feature_dim, config.dim)
            # The reference's head (flax nn.Dense): LeCun-normal weights, a normal truncated at 2 std
            # with variance 1/fan_in, and zero bias. PyTorch's default uniform bias would give every
            # untrained embedding a shared offset (mean pairwise cosine ~0.5 on unrelated features, ~0 so).
            lecun_normal_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self._transforms = None

    # -- computation -----------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """e_b: the L2-normalised backbone feature."""
        return F.normalize(self.backbone(x), dim=-1)

    def embed_features(self, e_b: torch.Tensor) -> torch.Tensor:
        """The universal embedding from e_b (training computes e_b once for all heads)."""
        return F.normalize(self.head(e_b), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(x))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def transforms(self) -> tuple:
        """``(train, eval)``: PIL image -> input tensor, both built from ``config.preprocess`` (see
        :mod:`uniret.embed.preprocess`). Extraction, training and search all take them from here."""
        if self._transforms is None:
            from .preprocess import eval_transform, train_transform

            self._transforms = (train_transform(self.config.preprocess), eval_transform(self.config.preprocess))
        return self._transforms

    @torch.inference_mode()
    def encode(self, images, dim: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings of a preprocessed batch tensor or a list of PIL
        images; ``dim`` picks a Matryoshka prefix (re-normalised). Returned on the model's device."""
        d = self.check_dim(dim)
        was_training = self.training
        self.eval()
        try:
            if isinstance(images, torch.Tensor):
                batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
            else:
                tf = self.transforms()[1]
                images = list(images)
                batches = [torch.stack([tf(im) for im in images[i:i + batch_size]])
                           for i in range(0, len(images), batch_size)]
            outs = [self(b.to(self.device, torch.float32)).float() for b in batches]
        finally:
            self.train(was_training)
        if not outs:
            return torch.zeros(0, d)
        z = torch.cat(outs)
        return F.normalize(z[:, :d], dim=-1) if d != self.config.dim else z

    # -- identity and persistence -------------------------------------------------------------
    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone and head tensors only, on the CPU, contiguous, unshared (for safetensors)."""
        out = {}
        for prefix, module in (("backbone.", self.backbone), ("head.", self.head)):
            for k, v in module.state_dict().items():
                out[prefix + k] = v.detach().to("cpu").contiguous().clone()
        return out

    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.inference_state_dict().items()):
            h.update(k.encode())
            h.update(str(v.dtype).encode())
            h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.float().numpy().tobytes())
        return h.hexdigest()[:16]

    def config_hash(self) -> str:
        """Identity of the model: its architecture, preprocessing and weights (not provenance).
        Stores record it so that embeddings of different models are never mixed."""
        return stable_hash({"architecture": self.config.architecture(), "weights": self.weights_digest()})

    def save(self, path: str | Path, provenance: dict | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically (temporary dir, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        if provenance is not None:
            self.config.provenance = dict(provenance)
        with scratch_dir(path) as tmp:  # removed again if writing fails (a full disk)
            save_file(self.inference_state_dict(), str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
            make_readable(tmp / WEIGHTS_NAME)
            config = self.config.to_json()
            config["config_hash"] = self.config_hash()
            atomic_write_json(tmp / CONFIG_NAME, config)
            publish_dir(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> UniversalEmbedder:
        """Rebuild from a model directory; the weights map onto any device (GPU-made -> CPU works)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cfg_file.is_file():
            raise UniretError(f"{path}: not a model directory (no {CONFIG_NAME}); make one with `uniret model init`")
        if not weights_file.is_file():
            raise UniretError(f"{path}: {WEIGHTS_NAME} is missing; re-export the model")
        try:
            raw = read_json(cfg_file)
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise UniretError(f"{cfg_file}: unreadable ({' '.join(str(exc).split())[:120]}); "
                              "the model directory is damaged, re-create it") from None
        config = ModelConfig.from_json(raw, str(cfg_file))
        try:
            state = load_file(str(weights_file), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise UniretError(f"{weights_file}: unreadable weights ({exc})") from None
        model = cls._from_state(config, state, weights_file)
        model.source_dir = path.resolve()  # recorded in stores, so an index can find its model
        return model.to(device).eval()

    def to_bytes(self) -> tuple[dict, bytes]:
        """The model as plain data, ``(config JSON, safetensors bytes)``: what processes on other
        machines rebuild it from (:meth:`from_bytes`; Ray actors), never a pickle."""
        from safetensors.torch import save

        return self.config.to_json(), save(self.inference_state_dict(), metadata={"format": FORMAT})

    @classmethod
    def from_bytes(cls, config: dict, weights: bytes, device: str | torch.device = "cpu") -> UniversalEmbedder:
        """The model of :meth:`to_bytes`' output, checked like a model directory."""
        from safetensors.torch import load

        model = cls._from_state(ModelConfig.from_json(config, "the model's config"), load(weights), "the model's weights")
        return model.to(device).eval()

    @classmethod
    def _from_state(cls, config: ModelConfig, state: dict, weights_file) -> UniversalEmbedder:
        """A model of ``config`` holding the tensors ``state`` (checked against its architecture)."""
        backbone = create_backbone(config.backbone, image_size=config.backbone_image_size(), pool=config.pool)
        model = cls(backbone, config)
        own = model.inference_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise UniretError(
                f"{weights_file} does not match {config.backbone}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
        if wrong:
            k = wrong[0]
            raise UniretError(f"{weights_file}: {len(wrong)} tensor(s) of the wrong shape for {config.backbone}, e.g. "
                              f"{k} {tuple(state[k].shape)} instead of {tuple(own[k].shape)}; re-export the model")
        model.backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
        model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        return model


def is_model_output(path: Path) -> bool:
    """A model directory that uniret wrote (its config.json has the model format)."""
    return has_format(path, CONFIG_NAME, FORMAT.split("/")[0])


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory at ``path``: a uniret model directory itself, or the ``model/`` folder of a
    training run directory. Every command that takes a model path reads it through this."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / "model" / CONFIG_NAME).is_file():
        return p / "model"
    if not p.exists():
        raise UniretError(f"{p}: no such model directory")
    raise UniretError(f"{p}: not a model directory (no {CONFIG_NAME}) nor a training run (no model/{CONFIG_NAME}); "
                      "make one with `uniret model init` or `uniret train`")


def is_model_dir(name: str | Path) -> bool:
    """True when ``name`` names a model or run directory rather than a ``source:`` backbone."""
    text = str(name)
    if text.split(":", 1)[0] in SOURCES:
        return False
    p = Path(text)
    return (p / CONFIG_NAME).is_file() or (p / "model" / CONFIG_NAME).is_file()


def build_model(backbone: str, dim: int | None = None, nested_dims=None, pretrained: bool = False,
                weights: str | Path | None = None, image_size: int | None = None,
                pool: str | None = None, crop_pct: float | None = None, head: str = "linear") -> UniversalEmbedder:
    """A new UniversalEmbedder: the named backbone (or a uniret model or run directory's trained
    backbone, with its preprocessing) and a freshly initialised head of size ``dim`` (default 64).

    ``head``: ``linear`` (LeCun-normal, trained by `uniret train`), ``none`` (the backbone's pooled,
    L2-normalised features: ``dim`` is the feature width) or ``pca`` (a linear head that
    :func:`uniret.embed.pca.fit_pca` sets to PCA-whitening fitted on images).
    ``crop_pct`` sets the evaluation crop stored in the preprocess config (1.0: resize the short side
    to the input size and centre-crop, as the UDON/UnED reference evaluates); None keeps the
    backbone's default (timm's pretrained config, 1.0 for open_clip).
    """
    from .preprocess import check_crop_pct

    if head not in HEADS:
        raise UniretError(f"--head {head!r}: choose one of {', '.join(HEADS)}")
    if head == "none" and nested_dims:
        raise UniretError("--head none keeps the backbone's features whole: drop --nested-dims (or use --head pca)")
    crop_pct = check_crop_pct(crop_pct)
    if is_model_dir(backbone):
        if image_size is not None or pool is not None or pretrained or weights is not None:
            raise UniretError(f"{backbone}: a uniret model directory brings its own weights, image size and pooling; "
                              "drop --image-size/--pool/--pretrained/--weights")
        source = UniversalEmbedder.load(resolve_model_dir(backbone))
        bb, preprocess, pool = source.backbone, dict(source.config.preprocess), source.config.pool
    else:
        bb = create_backbone(backbone, pretrained=pretrained, weights=weights, image_size=image_size, pool=pool)
        preprocess = dict(bb.data_config)
    if head == "none":
        if dim is not None and int(dim) != bb.feature_dim:
            raise UniretError(f"--head none embeds with the backbone's {bb.feature_dim} features: drop --dim {dim} "
                              f"or use --head pca --dim {dim}")
        dim = bb.feature_dim
    dim = 64 if dim is None else int(dim)
    nested = check_nested_dims(dim, nested_dims)
    if head == "pca" and dim > bb.feature_dim:
        raise UniretError(f"--head pca --dim {dim}: at most the backbone's {bb.feature_dim} features")
    if crop_pct is not None:
        preprocess["crop_pct"] = crop_pct
    config = ModelConfig(
        backbone=bb.name, dim=dim, nested_dims=nested, feature_dim=bb.feature_dim, pool=pool, head=head,
        preprocess=preprocess,
        provenance={"init": {"backbone": str(backbone), "pretrained": bool(pretrained),
                             "weights": str(weights) if weights else None,
                             "weights_source": bb.weights_source if not is_model_dir(backbone) else None}},
    )
    return UniversalEmbedder(bb, config).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> UniversalEmbedder:
    """Load a model directory (or the ``model/`` folder of a training run directory)."""
    return UniversalEmbedder.load(resolve_model_dir(path), device=device)
