"""PCA-whitening heads: the classic retrieval recipe for an untrained (pretrained) backbone.

The backbone's L2-normalised features e_b of a set of images (the images to be indexed, or any
sample of the same kind) give a mean mu and the eigen-decomposition of their covariance; the head
projects onto the top ``dim`` directions and divides each by ``sqrt(lambda + shrink * mean(lambda))``,
i.e. ``head(e_b) = W (e_b - mu)`` with ``W = diag((lambda + s)^-1/2) U^T``: one ``nn.Linear``
(weights ``W``, bias ``-W mu``), so a PCA model is stored, loaded, exported and served exactly
like a trained one. ``shrink`` = 0 is full whitening; larger values damp the small components, whose
noise full whitening would amplify as much as the signal (Jegou & Chum, ECCV 2012).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import UniretError

logger = logging.getLogger("uniret")

DEFAULT_SHRINK = 0.1


def pca_whitening(features: np.ndarray, dim: int, shrink: float = DEFAULT_SHRINK) -> tuple[np.ndarray, np.ndarray]:
    """``(W (dim, F), b (dim,))`` of the PCA-whitening of ``features`` (n, F), eigenvalues descending."""
    x = np.asarray(features, dtype=np.float64)
    n, width = x.shape
    if n < 2:
        raise UniretError(f"PCA needs at least 2 images, got {n}")
    if not 1 <= dim <= width:
        raise UniretError(f"--dim {dim}: a PCA head has 1..{width} dimensions (the backbone's features)")
    if not (np.isfinite(shrink) and shrink >= 0):
        raise UniretError(f"--pca-shrink must be 0 or more, got {shrink}")
    mu = x.mean(axis=0)
    cov = np.cov(x - mu, rowvar=False)
    values, vectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(values)[::-1][:dim]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    reg = shrink * float(values.mean()) if values.size else 0.0
    scale = 1.0 / np.sqrt(values + reg + 1e-12)
    weight = (vectors * scale).T  # (dim, F)
    # A deterministic sign per component (eigh's is arbitrary): the largest loading is positive.
    signs = np.sign(weight[np.arange(dim), np.abs(weight).argmax(axis=1)])
    weight *= np.where(signs == 0, 1.0, signs)[:, None]
    return weight.astype(np.float32), (-weight @ mu).astype(np.float32)


def backbone_features(model, items, batch_size: int = 64, device: str | None = None, workers: int = 0) -> np.ndarray:
    """e_b (n_ok, F) float32 of the readable ``items`` (unreadable ones are left out and counted)."""
    from ..utils import resolve_device
    from .extract import embedded_batches
    from .model import ModelConfig, UniversalEmbedder

    config = ModelConfig(**{**model.config.__dict__, "head": "none", "dim": model.config.feature_dim,
                            "nested_dims": None})
    plain = UniversalEmbedder(model.backbone, config)
    dev = torch.device(resolve_device(device))
    ids = np.arange(len(items), dtype=np.int64)
    rows, bad = [], 0
    for _, vectors, ok, _ in embedded_batches(plain, items, ids, dev, batch_size, workers):
        rows.append(vectors[ok])
        bad += int((~ok).sum())
    if bad:
        logger.warning("%d of %d images could not be read and were left out of the PCA", bad, len(items))
    return np.concatenate(rows) if rows else np.zeros((0, model.config.feature_dim), np.float32)


def fit_pca(model, items, shrink: float = DEFAULT_SHRINK, batch_size: int = 64, device: str | None = None,
            workers: int = 0, describe: str | None = None):
    """Set ``model``'s (a ``head="pca"`` model) head to the PCA-whitening of its backbone features on
    ``items``; records what it was fitted on in the provenance. Returns the model."""
    if model.config.head != "pca":
        raise UniretError("fit_pca needs a model built with head='pca'")
    features = backbone_features(model, items, batch_size, device, workers)
    weight, bias = pca_whitening(features, model.config.dim, shrink)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(weight))
        model.head.bias.copy_(torch.from_numpy(bias))
    model.config.provenance["pca"] = {"images": int(len(features)), "shrink": float(shrink),
                                      **({"data": describe} if describe else {})}
    return model.to("cpu").eval()
