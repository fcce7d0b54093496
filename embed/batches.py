"""What every embedding engine shares (this process's loader loop in :mod:`uniret.embed.extract`, the
Ray actors of :mod:`uniret.embed.ray_embed`): the inputs of a batch (:class:`EmbedDataset`: read,
decode, preprocess; an unreadable image is a failed row, never a crash), the model's forward pass
(:class:`Forward`), where rows go (:class:`RowSink`) and the last step of a run (:func:`publish`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np
import torch

from .. import testing
from ..data.collection import ItemList
from ..data.images import decode_image
from ..errors import UniretError
from .model import UniversalEmbedder
from .store.layout import NONFINITE
from .store.parts import EmbedJob
from .store.reader import EmbeddingStore
from .store.writer import PartWriter

logger = logging.getLogger("uniret")


class EmbedDataset(torch.utils.data.Dataset):
    """Item ``ids[j]`` -> (id, image tensor, ok, reason); unreadable images give a zero tensor."""

    def __init__(self, items: ItemList, ids: np.ndarray, transform, input_size):
        self.items = items
        self.ids = np.asarray(ids, dtype=np.int64)
        self.transform = transform
        self.input_size = tuple(int(v) for v in input_size)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int):
        i = int(self.ids[j])
        try:
            x = self.transform(decode_image(self.items.get_image_bytes(i)))
            return i, x, True, ""
        except (UniretError, OSError, KeyError) as exc:  # ImageDecodeError is a UniretError
            return i, torch.zeros(self.input_size), False, str(exc).splitlines()[0][:200]


class Forward:
    """The model's forward pass on preprocessed batches: on ``dev`` (channels_last, bf16/fp16
    autocast on CUDA) or under ONNX Runtime (``onnx``). Shared by this process's loader loop and the
    Ray actors of ``--engine ray`` (:mod:`uniret.embed.ray_embed`)."""

    def __init__(self, model: UniversalEmbedder, dev: torch.device, amp: bool = True, onnx=None):
        if onnx is not None:
            dev = torch.device("cpu")  # ONNX Runtime takes host arrays and places them on its own device
        self.model, self.dev, self.onnx = model.to(dev).eval(), dev, onnx
        self.use_cuda = dev.type == "cuda"
        if self.use_cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        amp_dtype = torch.bfloat16 if self.use_cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.autocast = torch.autocast("cuda", dtype=amp_dtype) if (self.use_cuda and amp) else nullcontext()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, ok: np.ndarray, reasons: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(vectors (n, D) float32, ok, reasons)``: a row whose embedding is not finite is not ok."""
        x = x.to(self.dev, non_blocking=True)
        if self.use_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.onnx is not None:
            vectors = self.onnx.run(x.numpy())
        else:
            with self.autocast:
                z = self.model(x)
            vectors = z.float().cpu().numpy()
        finite = np.isfinite(vectors).all(axis=1)
        for j in np.flatnonzero(ok & ~finite):
            reasons[j] = NONFINITE
        return vectors, ok & finite, reasons


def publish(job: EmbedJob) -> EmbeddingStore:
    """Write the manifest over the job's parts, publish the store and say what was skipped."""
    store = job.publish()
    if store.failed:
        first = next(iter(store.failed.items()))
        logger.warning("%d unreadable images skipped (zero rows, listed in the parts); e.g. id %s: %s",
                       len(store.failed), first[0], first[1])
    if store.notes:
        logger.warning("%d input problems skipped while listing (listed in the parts); e.g. %s",
                       len(store.notes), store.notes[0])
    return store



class RowSink:
    """Where embedded rows go: this process's part writer; :meth:`flush` makes the rows added since
    the last flush durable (then a kill loses none of them)."""

    def __init__(self, writer: PartWriter):
        self.writer = writer
        self.rows: list[np.ndarray] = []

    def add(self, rows: np.ndarray, vectors: np.ndarray, ok: np.ndarray, reasons: list[str]) -> None:
        self.writer.write(rows[ok], vectors[ok])
        for row, reason, good in zip(rows, reasons, ok):
            if not good:
                self.writer.mark_failed(int(row), reason)
        self.rows.append(rows)

    def flush(self) -> None:
        if not self.rows:
            return
        self.writer.checkpoint(np.concatenate(self.rows))
        self.rows.clear()
        testing.sleep_point("embed")  # lets tests kill a real run between two checkpoints
