"""Validation of a collection (``uniret data check``): errors that make it unusable, warnings that
deserve a look, and a per-domain, per-split summary table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from ..errors import UniretError
from ..safeio import MissingImage, UnsafePath, check_contained
from .collection import SPLITS, Collection, DuplicatePaths, FolderCollection, Record
from .folder import FOLDER_SPLIT, LabelledFolder
from .sources import open_collection

REQUIRED_SPLITS = ("train", "val", "test")
_EXAMPLES = 3


@dataclass
class CheckResult:
    rows: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _class_stats(records: list[Record]) -> dict:
    per_class = Counter(c for r in records for c in r.class_ids)
    sizes = sorted(per_class.values())
    return {
        "images": len(records),
        "classes": len(per_class),
        "min": sizes[0] if sizes else 0,
        "median": median(sizes) if sizes else 0,
        "max": sizes[-1] if sizes else 0,
    }


def _examples(values: list[str]) -> str:
    shown = ", ".join(values[:_EXAMPLES])
    return shown + (f", ... ({len(values) - _EXAMPLES} more)" if len(values) > _EXAMPLES else "")


def _file_problems(coll: FolderCollection, records: list[Record]) -> tuple[list[str], list[str]]:
    """Record paths whose file is missing, and those refused by :func:`uniret.safeio.check_contained`
    (with the reason): nothing is opened, so a FIFO or a device cannot hang or flood the check."""
    missing, unsafe = [], []
    for r in records:
        try:
            check_contained(coll.image_root, r.path)
        except MissingImage:
            missing.append(r.path)
        except UnsafePath as exc:
            unsafe.append(str(exc))
    return missing, unsafe


def check_collection(path: str | Path, info_dir: str = "info", image_root: str | None = None,
                     required_splits: tuple[str, ...] = REQUIRED_SPLITS, check_files: bool = True) -> CheckResult:
    """Validate every split of every domain; never stops at the first problem."""
    res = CheckResult()
    coll: Collection = open_collection(path, info_dir=info_dir, image_root=image_root)
    is_folder = isinstance(coll, FolderCollection)
    if isinstance(coll, LabelledFolder):
        # Labels from the folder layout: one split, each image searched against the others.
        required_splits = (FOLDER_SPLIT,)
        res.notes.append(f"{coll.root}: an image folder, labels from its subfolders (layout {coll.layout}: "
                         f"{len(coll.domains)} domain(s)); `uniret eval {coll.root}` searches every image "
                         "against the others")
    for domain in coll.domains:
        present = coll.splits(domain)
        errors_before = len(res.errors)
        where = (lambda s, d=domain: coll.split_file(d, s)) if is_folder else (lambda s, d=domain: f"{coll.root}:{d}/{s}")
        for s in required_splits:
            if s not in present:
                res.errors.append(f"{where(s)}: split file missing (domain {domain!r} needs {', '.join(required_splits)})")
        loaded: dict[str, list[Record]] = {}
        for s in present:
            try:
                loaded[s] = coll.records(domain, s)
            except DuplicatePaths as exc:  # reported below, with every other problem of the split
                loaded[s] = exc.records
            except UniretError as exc:
                res.errors.append(str(exc))
        if not any(loaded.values()) and len(res.errors) == errors_before:
            res.errors.append(f"domain {domain!r}: no images in any split")
        for s, recs in loaded.items():
            dup = [p for p, n in Counter(r.path for r in recs).items() if n > 1]
            if dup:
                res.errors.append(f"{where(s)}: {len(dup)} duplicate paths (compared in canonical form: a/./x.png "
                                  f"and a//x.png are a/x.png), e.g. {_examples(dup)}")
            if check_files and is_folder:
                missing, unsafe = _file_problems(coll, recs)
                if missing:
                    res.errors.append(f"{where(s)}: {len(missing)} image files do not exist under "
                                      f"{coll.image_root}, e.g. {_examples(missing)}")
                if unsafe:
                    res.errors.append(f"{where(s)}: {len(unsafe)} record paths are refused (outside the image root, "
                                      f"not regular files or too large; never read), e.g. {_examples(unsafe)}")
            res.rows.append({"domain": domain, "split": s, **_class_stats(recs)})
        train = loaded.get("train")
        if train:
            ids = sorted({c for r in train for c in r.class_ids})
            if ids != list(range(len(ids))):
                res.warnings.append(f"{where('train')}: train class ids are not contiguous from 0 "
                                    f"({len(ids)} classes, ids {ids[0]}..{ids[-1]}); classifiers get {ids[-1] + 1} outputs")
        for qsplit in ("val", "test"):
            if qsplit not in loaded:
                continue
            isplit = "index" if qsplit == "test" and "index" in loaded else qsplit
            index_counts = Counter(c for r in loaded[isplit] for c in r.class_ids)
            lonely = []
            for r in loaded[qsplit]:
                # A query matches itself when it searches its own split: it needs another image.
                own = 1 if isplit == qsplit else 0
                if all(index_counts[c] - own <= 0 for c in r.class_ids):
                    lonely.append(r.path)
            if lonely:
                res.warnings.append(f"{where(qsplit)}: {len(lonely)} queries have no relevant {isplit} image "
                                    f"(excluded from metrics), e.g. {_examples(lonely)}")
    if not is_folder and getattr(coll, "skipped", None):
        sk = [f"{s['domain']}/{s['split']}/{s['path']}" for s in coll.skipped]
        res.warnings.append(f"{coll.root}: {len(sk)} images were unreadable when packed, e.g. {_examples(sk)}")
    res.rows.sort(key=lambda r: (r["domain"], SPLITS.index(r["split"])))
    return res
