"""Faiss GPU helpers, all gated on ``faiss.get_num_gpus() > 0`` (never on the presence of the GPU
classes: the faiss-gpu wheel has them on machines without a GPU, METHOD.md §5)."""

from __future__ import annotations

from ..errors import UsageError

#: Faiss GPU k-selection limit (k and nprobe); the one limit every GPU search path checks.
GPU_MAX_K = 2048


def num_gpus() -> int:
    import faiss

    return int(faiss.get_num_gpus())


def resolve(gpu: str, gpus: int | None = None) -> tuple[bool, int]:
    """``--gpu auto|on|off`` and ``--gpus N`` -> (use the GPU, how many GPUs)."""
    if gpu not in ("auto", "on", "off"):
        raise UsageError(f"--gpu must be auto, on or off, not {gpu!r}")
    if gpus is not None and gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {gpus}")
    have = num_gpus() if gpu != "off" else 0
    if gpu == "on" and have == 0:
        raise UsageError("--gpu on, but Faiss sees no GPU (faiss.get_num_gpus() == 0); use --gpu auto or off")
    if gpus is not None and gpus > have and gpu == "on":
        raise UsageError(f"--gpus {gpus}, but Faiss sees only {have} GPU(s)")
    n = min(gpus or have, have)
    return n > 0, n


def gpu_capable(key: str) -> bool:
    """Faiss has GPU versions of Flat, IVFFlat, IVFSQ and IVFPQ; not of HNSW."""
    return "HNSW" not in key


def to_gpus(index, ngpu: int, shard: bool = False):
    """Clone a CPU index to ``ngpu`` GPUs: sharded (capacity) or replicated (throughput)."""
    import faiss

    co = faiss.GpuMultipleClonerOptions()
    co.shard = bool(shard)
    co.useFloat16 = False
    if ngpu == 1:
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index, co)
        gpu_index.referenced_resources = res  # keep the resources alive with the index
        return gpu_index
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu)


def to_cpu(index):
    """A CPU copy of a GPU index (GPU indexes cannot be written directly); CPU indexes as they are."""
    import faiss

    if num_gpus() == 0:
        return index
    try:
        return faiss.index_gpu_to_cpu(index)
    except (RuntimeError, AttributeError):
        return index
