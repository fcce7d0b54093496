"""Training with a frozen part of the backbone, on cached features (``--freeze-backbone``,
``--train-blocks N``).

The backbone is cut at a stage boundary into a frozen prefix and a trainable rest, with
``backbone(x) == rest(prefix(x))`` (checked on a probe input when the cut is made). The prefix keeps
its weights and BatchNorm statistics (eval mode, no gradients), so its output for an augmented view
of an image never changes: it is computed once per image and per view and cached.

Views: each image has ``views`` augmented views; view ``v`` of image ``(domain, position)`` is made
with a seed derived from ``(cache seed, domain, position, v)``, and the step's slot seed picks the
view (``seed % views``). Training on the cache and training with the prefix in the loop therefore see
the same inputs for the same seed and views (a test compares their losses), and a small number of
views gives a CPU thousands of head steps a minute.

The cache (a directory, ``--feature-cache DIR``, shareable between runs) is keyed by content like
every other cache: its key covers the prefix's architecture and weights, the preprocessing and
augmentation of every domain, the views, the seed and the storage type; within it every row carries
a digest of its image's bytes, so a changed image has its rows recomputed and the rest are reused.
An interrupted build keeps the rows it finished.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UniretError
from ..guards import check_apart, check_writable, output_lock
from ..utils import atomic_write_json, progress_bar, stable_hash
from .data import TrainData, read_image, view_seed

logger = logging.getLogger("uniret")

FORMAT = "uniret-feature-cache/1"
DIGEST = 16  # bytes of blake2b per image
UNREADABLE = b"\xff" * DIGEST


class Chain(nn.Module):
    """Modules (and the model's own head function) applied in order."""

    def __init__(self, parts: list, head=None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self._head = head  # a bound method of the timm model (its parameters belong to the backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
        if self._head is not None:
            x = self._head(x)
        return x


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def backbone_stages(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module], object]:
    """``(stem, stages, tail, head)`` of a CNN: ``head(tail(stages(stem(x)))) == model(x)``.

    Known layouts: timm's EfficientNet family (``conv_stem``/``bn1``/``blocks``/``conv_head``/``bn2``),
    MobileNetV3 (its conv head sits in ``forward_head``), ResNet-like (``conv1``...``layer4``) and a
    plain ``nn.Sequential`` (its children are the stages)."""
    if isinstance(model, nn.Sequential):
        return [], list(model.children()), [], None
    if type(model).__name__ == "PlainNet":  # uniret.embed.plain
        return [], list(model.features), [], lambda x: x.mean(dim=(-2, -1))
    names = {n for n, _ in model.named_children()}
    if {"conv_stem", "bn1", "blocks"} <= names and isinstance(model.blocks, nn.Sequential):
        tail = [model.conv_head, model.bn2] if type(model).__name__ == "EfficientNet" else []
        return [model.conv_stem, model.bn1], list(model.blocks), tail, model.forward_head
    if {"conv1", "bn1", "layer1", "layer4"} <= names:
        stem = [model.conv1, model.bn1, model.act1, model.maxpool]
        return stem, [getattr(model, f"layer{i}") for i in range(1, 5)], [], model.forward_head
    raise UniretError(f"--train-blocks: cannot cut a {type(model).__name__} into stages (EfficientNet, MobileNetV3, "
                      "ResNet and plain CNNs can); use --freeze-backbone or train it whole")


def split_backbone(backbone, train_blocks: int | None) -> tuple[nn.Module, nn.Module]:
    """``(prefix, rest)`` with ``backbone(x) == rest(prefix(x))``. ``train_blocks`` None: the whole
    backbone is the prefix (its pooled features are cached) and the rest is the identity; N: the
    last N stages (with the conv head and pooling) train."""
    if train_blocks is None:
        return backbone, nn.Identity()
    stem, stages, tail, head = backbone_stages(backbone.model)
    if not 1 <= train_blocks <= len(stages):
        raise UniretError(f"--train-blocks {train_blocks}: {backbone.name} has {len(stages)} stages; choose 1..{len(stages)}")
    cut = len(stages) - train_blocks
    prefix = Chain([*stem, *stages[:cut]])
    rest = Chain([*stages[cut:], *tail], head=head)
    pooled = Chain([rest, *([backbone.pool] if backbone.pool is not None else []), Flatten()])
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        x = torch.randn(2, *backbone.data_config["input_size"])
        ok = torch.allclose(pooled(prefix(x)), backbone(x), atol=1e-4, rtol=1e-3)
    backbone.train(was)
    if not ok:
        raise UniretError(f"--train-blocks: cutting {backbone.name} into stages changes its output; "
                          "use --freeze-backbone or train it whole")
    return prefix, pooled


def freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def image_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST).digest()


class FeatureCache:
    """The prefix's output for every view of every train image: ``features[view, row]`` (row = the
    image's position in the concatenated train splits of the run's domains)."""

    def __init__(self, root: str | Path, data: TrainData, prefix: nn.Module, key_fields: dict, views: int,
                 seed: int, dtype: str, input_size, inputs=()):
        self.views, self.seed, self.data = int(views), int(seed), data
        self.dtype = np.dtype(dtype)
        self.key = stable_hash({"format": FORMAT, **key_fields, "prefix": weights_digest(prefix), "views": self.views,
                                "seed": self.seed, "dtype": self.dtype.name, "domains": data.domains,
                                "sizes": data.sizes})
        root = Path(root)
        check_apart(root, inputs, "--feature-cache")
        check_writable(root, "--feature-cache")
        self.path = root / self.key
        self.prefix = prefix
        self.input_size = tuple(int(v) for v in input_size)

    def build(self, device: torch.device, batch_size: int = 64) -> tuple[torch.Tensor, np.ndarray, float]:
        """Compute the missing or stale rows; returns (features, readable rows mask, seconds spent)."""
        started = time.perf_counter()
        n = int(sum(self.data.sizes))
        with output_lock(self.path, "feature cache"):
            self.path.mkdir(parents=True, exist_ok=True)
            digests = self._digests(n)
            stored = self._stored_digests(n)
            todo = np.flatnonzero(np.any(digests != stored, axis=1))
            feats = self._features(n, device)
            if len(todo):
                logger.info("feature cache %s: computing %d of %d images x %d views", self.path, len(todo), n, self.views)
                self._compute(feats, todo, digests, stored, device, batch_size)
            else:
                logger.info("feature cache %s: all %d images x %d views reused", self.path, n, self.views)
            readable = np.any(digests != np.frombuffer(UNREADABLE, np.uint8), axis=1)
            tensor = torch.from_numpy(np.ascontiguousarray(feats))
        return tensor, readable, time.perf_counter() - started

    # -- files -----------------------------------------------------------------------------------
    def _digests(self, n: int) -> np.ndarray:
        out = np.zeros((n, DIGEST), np.uint8)
        for row in range(n):
            try:
                data = self.data.items.get_image_bytes(row)
                out[row] = np.frombuffer(image_digest(data), np.uint8)
            except (UniretError, OSError):
                out[row] = np.frombuffer(UNREADABLE, np.uint8)
        return out

    def _stored_digests(self, n: int) -> np.ndarray:
        f = self.path / "digests.npy"
        try:
            stored = np.load(f, allow_pickle=False)
            if stored.shape == (n, DIGEST) and stored.dtype == np.uint8:
                return stored
        except (OSError, ValueError):
            pass
        return np.zeros((n, DIGEST), np.uint8)

    def _features(self, n: int, device: torch.device) -> np.ndarray:
        f = self.path / "features.npy"
        shape = (self.views, n, *self._row_shape(device))
        if f.is_file():
            try:
                arr = np.load(f, mmap_mode="r+", allow_pickle=False)
                if arr.shape == shape and arr.dtype == self.dtype:
                    return arr
            except (OSError, ValueError):
                pass
            (self.path / "digests.npy").unlink(missing_ok=True)
        atomic_write_json(self.path / "meta.json", {"format": FORMAT, "key": self.key, "views": self.views,
                                                    "seed": self.seed, "shape": list(shape), "dtype": self.dtype.name})
        return np.lib.format.open_memmap(f, mode="w+", dtype=self.dtype, shape=shape)

    def _row_shape(self, device: torch.device) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(self.prefix(torch.zeros(1, *self.input_size, device=device)).shape[1:])

    def _compute(self, feats: np.ndarray, todo: np.ndarray, digests: np.ndarray, stored: np.ndarray,
                 device: torch.device, batch_size: int) -> None:
        from .data import augment, isolated_rng

        domain_of = np.repeat(np.arange(len(self.data.sizes)), self.data.sizes)
        offsets = np.asarray(self.data.offsets)
        bad = np.frombuffer(UNREADABLE, np.uint8)
        with progress_bar("feature cache", len(todo)) as advance:
            for start in range(0, len(todo), batch_size):
                rows = todo[start:start + batch_size]
                batch = [[] for _ in range(self.views)]
                kept = []
                with isolated_rng():
                    for row in rows:
                        if (digests[row] == bad).all():
                            continue
                        image = read_image(self.data.items, int(row))
                        if image is None:
                            digests[row] = bad
                            continue
                        d = int(domain_of[row])
                        pos = int(row - offsets[d])
                        for v in range(self.views):
                            batch[v].append(augment(self.data.transforms[d], image, view_seed(self.seed, d, pos, v)))
                        kept.append(int(row))
                if kept:
                    with torch.inference_mode():
                        for v in range(self.views):
                            out = self.prefix(torch.stack(batch[v]).to(device))
                            feats[v, kept] = out.float().cpu().numpy().astype(self.dtype)
                    feats.flush()
                stored[rows] = digests[rows]
                np.save(self.path / "digests.npy", stored)  # rows are marked done after their features
                advance(len(rows))


class CachedTrainData:
    """:class:`TrainData`'s interface over cached prefix outputs: ``load`` returns the cached view of
    each position (the one its slot seed picks) instead of decoding and augmenting it."""

    def __init__(self, data: TrainData, features: torch.Tensor, readable: np.ndarray, views: int):
        self.base, self.features, self.readable, self.views = data, features, readable, views
        self.domains, self.sizes, self.labels = data.domains, data.sizes, data.labels
        self.num_classes, self.offsets, self.items = data.num_classes, data.offsets, data.items
        self.decode_failures = 0

    def close(self) -> None:
        self.base.close()

    def load(self, domain: int, positions: list[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.offsets[domain]
        rows, views, labels = [], [], []
        for pos, seed in zip(positions, seeds, strict=True):
            tries = 0
            while not self.readable[base + pos]:
                self.decode_failures += 1
                tries += 1
                if tries >= self.sizes[domain]:
                    raise UniretError(f"no image of domain {self.domains[domain]!r} can be read; check the collection "
                                      f"with `uniret data check`")
                pos = (pos + 1) % self.sizes[domain]
            rows.append(base + pos)
            views.append(seed % self.views)
            labels.append(int(self.labels[domain][pos]))
        x = self.features[torch.tensor(views), torch.tensor(rows)].float()
        return x, torch.tensor(labels, dtype=torch.int64)



class CachedValData:
    """Validation images as the frozen prefix's outputs (eval transform, computed once on first use:
    the prefix never changes during the run)."""

    def __init__(self, val, prefix: nn.Module, device: torch.device):
        self.val, self.prefix, self.device = val, prefix, device
        self.items = val.items
        self._batches: list | None = None

    def __len__(self) -> int:
        return len(self.val)

    def batches(self, batch_size: int):
        if self._batches is None:
            out = []
            with torch.inference_mode():
                for rows, images in self.val.batches(batch_size):
                    out.append((rows, self.prefix(images.to(self.device)).cpu()))
            self._batches = out
        yield from self._batches


class CachedEmbedder(nn.Module):
    """The embedder applied to prefix outputs: ``head(normalize(rest(t)))``, for validation."""

    def __init__(self, embedder: nn.Module, rest: nn.Module):
        super().__init__()
        self.embedder, self.rest = embedder, rest

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed_features(torch.nn.functional.normalize(self.rest(t), dim=-1))
