"""The on-disk IVF index (``index build --on-disk``, and ``index add`` / ``remove`` on such an index).

Modules, layered in this order (no module imports one after it):

- :mod:`.budget`: the peak-RSS memory plan (:func:`plan_memory`) and the ``--workers`` check;
- :mod:`.vectors`: raw vectors on disk (:class:`ArrayWriter`, :class:`MappedArray`, chunked exact search);
- :mod:`.shards`: the build plan, the trained quantizer and the shard workers (the only reader of the store);
- :mod:`.lists`: inverted lists on disk (:class:`ListSource`, ``lists.ivfdata``, :func:`read_version_index`);
- :mod:`.version`: writing and publishing a version; :mod:`.tune`: nprobe within the memory budget;
- :mod:`.build`: the three resumable steps (train, encode, merge) and :func:`build_ondisk`;
- :mod:`.update`: :func:`add_ondisk` / :func:`remove_ondisk` on a live on-disk index.
"""

from .budget import DEFAULT_BUDGET, MemoryPlan, check_workers, fmt_bytes, plan_memory
from .build import (
    BUILD_DIR,
    ONDISK_KINDS,
    UPDATE_DIR,
    build_ondisk,
    check_step_options,
    encode_planned,
    encode_step,
    ensure_plan,
    memory_budget,
    merge_step,
    train_step,
)
from .lists import IVFDATA, ListSource, load_trained, read_version_index
from .update import add_ondisk, remove_ondisk
from .vectors import ArrayWriter, MappedArray, exact_search_chunked

__all__ = [
    "ArrayWriter", "BUILD_DIR", "DEFAULT_BUDGET", "IVFDATA", "ListSource", "MappedArray", "MemoryPlan",
    "ONDISK_KINDS", "UPDATE_DIR", "add_ondisk", "build_ondisk", "check_step_options", "check_workers",
    "encode_planned", "encode_step", "ensure_plan", "exact_search_chunked", "fmt_bytes", "load_trained",
    "memory_budget", "merge_step", "plan_memory", "read_version_index", "remove_ondisk", "train_step",
]
