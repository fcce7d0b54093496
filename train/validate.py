"""Validation during training: the student embedding on the merged validation protocol.

Every validation image is a query against ALL validation images of the training domains (one merged
index, self match dropped; METHOD.md §2); the model is selected by the unweighted mean R@1 over
domains, as in the reference. Metrics come from ``uniret.eval.protocol.evaluate_embeddings``.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch


@torch.no_grad()
def embed_validation(embedder, val, batch_size: int, device: torch.device, autocast: bool = False):
    """(N, D) float32 embeddings of the readable validation items, and those items."""
    was_training = embedder.training
    embedder.eval()
    rows_all, outs = [], []
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext()
    try:
        for rows, images in val.batches(batch_size):
            with amp:
                z = embedder(images.to(device))
            outs.append(torch.nn.functional.normalize(z.float(), dim=-1).cpu().numpy())
            rows_all.extend(rows)
    finally:
        embedder.train(was_training)
    vectors = np.concatenate(outs) if outs else np.zeros((0, 1), dtype=np.float32)
    return vectors, [val.items[i] for i in rows_all]


def validate(embedder, val, batch_size: int, device: torch.device, autocast: bool = False) -> dict:
    """Merged-protocol validation: mean R@1 / mAP@100 / mMP@5 and per-domain R@1."""
    from ..eval.protocol import evaluate_embeddings

    vectors, items = embed_validation(embedder, val, batch_size, device, autocast)
    result = evaluate_embeddings(vectors, items, vectors, items, self_match=True, k=100, protocol="merged")
    out = {name: value for name, value in result["mean"].items()}
    out["per_domain_R@1"] = {d: row["R@1"] for d, row in result["per_domain"].items()}
    out["queries"] = result["queries"]
    out["excluded"] = result["excluded"]
    return out
