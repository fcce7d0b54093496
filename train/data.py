"""Training and validation images: single-domain batches with deterministic augmentation.

Every image of a batch is augmented under its own seed, derived from (run seed, step, slot in the
global batch). The augmentation therefore does not depend on which process decodes it, how many
workers there are, how the global batch is split over DDP ranks, or whether the run was resumed:
an interrupted-and-resumed run sees exactly the same pixels.

Each domain has its own transform (per-domain augmentation, :mod:`uniret.train.augment`).
Unreadable or missing images are replaced by the next readable image of the same domain and counted,
so one bad file does not stop a long run.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Mapping

import numpy as np
import torch

from ..data import open_collection
from ..data.images import decode_image
from ..errors import ImageDecodeError, UniretError
from ..safeio import UnsafePath

logger = logging.getLogger("uniret")


def sample_seed(run_seed: int, step: int, slot: int) -> int:
    """A 63-bit seed for the augmentation of one image of one step."""
    return int(np.random.SeedSequence([run_seed, step, slot, 2654435761]).generate_state(2, np.uint64)[0] >> 1)


def view_seed(seed: int, domain: int, position: int, view: int) -> int:
    """The augmentation seed of view ``view`` of train image ``position`` of ``domain`` (a run with a
    frozen backbone part sees each image as one of a few fixed views: uniret.train.frozen)."""
    return int(np.random.SeedSequence([seed, domain, position, view, 40503]).generate_state(2, np.uint64)[0] >> 1)


def augment(transform, image, seed: int) -> torch.Tensor:
    """Run a torchvision transform under its own seed (inside :func:`isolated_rng`). Only the CPU
    generator is seeded: ``torch.manual_seed`` also seeds every accelerator, 100x slower per image."""
    torch.default_generator.manual_seed(seed)
    return transform(image)


def isolated_rng():
    """Seeding per image must not touch the caller's RNG: one save/restore of the global torch state
    around a whole batch (saving it per image costs ~1.5 ms, as much as augmenting the image)."""
    return torch.random.fork_rng(devices=[])


def read_image(items, index: int):
    """The decoded image of item ``index``, or None when it is unreadable, missing or refused
    (a path outside the image root, a FIFO, a device, too big: ``uniret.safeio.UnsafePath``)."""
    try:
        return decode_image(items.get_image_bytes(index))
    except (ImageDecodeError, UnsafePath, OSError):
        return None


class _Loader:
    """Decode + augment one image; lives in the training process or in each worker process."""

    def __init__(self, items, transforms: list):
        self.items, self.transforms = items, transforms

    def __call__(self, jobs: list[tuple[int, int, int]]) -> list[tuple[torch.Tensor | None, int]]:
        """(index, seed, domain) jobs -> (tensor or None when unreadable, index)."""
        out = []
        with isolated_rng():
            for index, seed, domain in jobs:
                image = read_image(self.items, index)
                out.append((None if image is None else augment(self.transforms[domain], image, seed), index))
        return out


_worker_loader: _Loader | None = None


def _worker_init(items, transforms) -> None:
    global _worker_loader
    torch.set_num_threads(1)
    _worker_loader = _Loader(items, transforms)


def _worker_load(jobs):
    return _worker_loader(jobs)


def resolve_domains(collection, domains: list[str] | None) -> list[str]:
    """The training domains: those asked for (checked), or every domain with a train split."""
    chosen = list(domains) if domains else [d for d in collection.domains if collection.has_split(d, "train")]
    for d in chosen:
        collection.check_domain(d)
        if not collection.has_split(d, "train"):
            raise UniretError(f"domain {d!r} has no train split in {collection.root}; train on other domains")
    if not chosen:
        raise UniretError(f"{collection.root}: no domain has a train split")
    return chosen


class TrainData:
    """The train splits of the chosen domains: positions, labels and batch loading.

    ``transforms`` is one transform for every domain or a mapping domain -> transform."""

    def __init__(self, data: str, domains: list[str] | None, transforms, workers: int = 0,
                 views: tuple[int, int] | None = None):
        #: (seed, count): augment each image as one of ``count`` fixed views (see uniret.train.frozen)
        self.views = views
        self.collection = open_collection(data)
        chosen = resolve_domains(self.collection, domains)
        self.domains = chosen
        self.items = self.collection.items(domains=chosen, splits=["train"])
        self.offsets, self.sizes, self.labels = [], [], []
        start = 0
        for d in chosen:
            records = self.collection.records(d, "train")
            self.offsets.append(start)
            self.sizes.append(len(records))
            # Multi-label records train on their first class id.
            self.labels.append(np.array([r.class_id for r in records], dtype=np.int64))
            start += len(records)
        self.num_classes = [int(lab.max()) + 1 if len(lab) else 0 for lab in self.labels]
        self.transforms = [transforms[d] for d in chosen] if isinstance(transforms, Mapping) else [transforms] * len(chosen)
        self.decode_failures = 0
        self._local = _Loader(self.items, self.transforms)
        self._pool, self._workers = None, workers
        if workers > 0:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self._pool = ctx.Pool(workers, initializer=_worker_init, initargs=(self.items, self.transforms))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def load(self, domain: int, positions: list[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, H, W) and labels (N,) of ``positions`` in ``domain``'s train split."""
        base = self.offsets[domain]
        jobs = [(base + p, self._seed(domain, p, s), domain) for p, s in zip(positions, seeds, strict=True)]
        if self._pool is not None:
            chunk = -(-len(jobs) // self._workers)
            results = [r for part in self._pool.map(_worker_load, [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)])
                       for r in part]
        else:
            results = self._local(jobs)
        images, labels = [], []
        for (tensor, index), pos, seed in zip(results, positions, seeds, strict=True):
            tries = 0
            while tensor is None:
                self.decode_failures += 1
                tries += 1
                if tries >= self.sizes[domain]:
                    raise UniretError(f"no image of domain {self.domains[domain]!r} can be read; check the collection "
                                      f"with `uniret data check`")
                logger.warning("unreadable or missing train image %s; using the next one", self.items[index].path)
                pos = (pos + 1) % self.sizes[domain]
                tensor, index = self._local([(base + pos, self._seed(domain, pos, seed), domain)])[0]
            images.append(tensor)
            labels.append(int(self.labels[domain][pos]))
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


    def _seed(self, domain: int, position: int, slot_seed: int) -> int:
        """The augmentation seed of a slot: its own, or that of the fixed view it picks."""
        if self.views is None:
            return slot_seed
        seed, count = self.views
        return view_seed(seed, domain, position, slot_seed % count)


class ValData:
    """The validation images of the training domains, preprocessed once (small sets) or per call."""

    CACHE_BYTES = 1 << 30

    def __init__(self, data: str, domains: list[str], split: str, transform):
        collection = open_collection(data)
        present = [d for d in domains if collection.has_split(d, split)]
        self.items = collection.items(domains=present, splits=[split]) if present else None
        self.transform = transform
        self._cache: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return 0 if self.items is None else len(self.items)

    def batches(self, batch_size: int):
        """Yield (rows, images) in item order; rows of unreadable images are left out."""
        if self._cache is not None:
            for rows, images in self._cache:
                yield rows, images
            return
        cache: list | None = []
        size = 0
        for start in range(0, len(self), batch_size):
            rows, images = [], []
            for i in range(start, min(start + batch_size, len(self))):
                image = read_image(self.items, i)
                if image is None:
                    logger.warning("unreadable or missing validation image %s; left out", self.items[i].path)
                    continue
                images.append(self.transform(image))
                rows.append(i)
            if not rows:
                continue
            batch = torch.stack(images)
            size += batch.numel() * batch.element_size()
            if cache is not None and size <= self.CACHE_BYTES:
                cache.append((rows, batch))
            else:
                cache = None  # too large to keep: decode again at the next validation
            yield rows, batch
        self._cache = cache
