"""The index directory on disk: versions, the CURRENT pointer, and the id -> metadata LMDB.

::

    INDEX/
      CURRENT              name of the live version, e.g. "v000002" (replaced with os.replace)
      v000002/
        manifest.json      format, model, dim, metric, key, search params, counts, measured recall
        index.faiss        the Faiss index (ids = uniret ids)
        ids.npy            (n,) int64, ascending: the ids present
        vectors.npy        (n, dim) float16, row r = ids[r] (rerankers and exact refinement read them)
        meta/              LMDB: b"id/<16 hex>" -> JSON item, b"key/<domain>/<split>/<path>" -> id
      model/               a copy of the model directory (so search embeds images without --model)
      .lock                flock'ed by writers

A writer builds the next version in ``vNNNNNN.partial``, renames it to ``vNNNNNN`` and then swaps
CURRENT; a crash at any point leaves CURRENT on a complete version. Leftovers are removed by the
next writer. The previous version is kept, so readers that opened it keep working.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..data.collection import Item
from ..errors import UniretError
from ..safeio import check_lmdb, load_npy, parse_json
from ..utils import atomic_write_text, read_json, stable_hash

FORMAT = "uniret-index/1"
CURRENT = "CURRENT"
MODEL_DIR = "model"
LMDB_MAP_SIZE = 1 << 40  # virtual; LMDB only uses what it writes


def item_key(item: Item) -> bytes:
    """The identity used to skip items already present on ``index add``."""
    return f"key/{item.domain or ''}/{item.split or ''}/{item.path}".encode()


def id_key(i: int) -> bytes:
    return f"id/{int(i):016x}".encode()


def is_index_dir(path: Path) -> bool:
    return (path / CURRENT).is_file()


_VERSION_NAME = re.compile(r"v[0-9]{6}")


def current_version(root: Path) -> Path:
    """The live version directory named by CURRENT, which must be a plain version name
    (``vNNNNNN``): a CURRENT pointing anywhere else (``..``, an absolute path) is refused."""
    root = Path(root)
    if not is_index_dir(root):
        raise UniretError(f"{root}: not an index directory (no {CURRENT}); build one with `uniret index build`")
    try:
        name = (root / CURRENT).read_bytes()[:64].decode("ascii").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _VERSION_NAME.fullmatch(name):
        raise UniretError(f"{root / CURRENT}: does not name a version (vNNNNNN); the index is damaged, rebuild it")
    path = root / name
    if not (path / "manifest.json").is_file() or path.is_symlink():
        raise UniretError(f"{root}: CURRENT points at {name!r}, which is missing; the index is damaged, rebuild it")
    return path


#: Manifest fields every reader relies on, with their types.
_MANIFEST_FIELDS = {"key": str, "count": int, "dim": int, "next_id": int, "metric": str}


def read_manifest(version_dir: Path) -> dict:
    path = version_dir / "manifest.json"
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        raise UniretError(f"{path}: unreadable index manifest ({' '.join(str(exc).split())[:120]}); "
                          "the index is damaged, rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UniretError(f"{version_dir}: unknown index format {found!r} (expected {FORMAT})")
    bad = [k for k, t in _MANIFEST_FIELDS.items()
           if not isinstance(manifest.get(k), t) or isinstance(manifest.get(k), bool)
           or (t is int and manifest[k] < 0)]
    if bad or manifest["dim"] == 0:
        raise UniretError(f"{path}: damaged index manifest ({', '.join(bad) or 'dim'} missing or of the wrong type); "
                          "rebuild the index")
    return manifest


def version_file(version_dir: Path, name, what: str = "file") -> Path:
    """The file ``name`` that a version's manifest names, checked like a user's path: a plain name
    (no ``/``, ``..``, absolute path or NUL) of a regular file directly inside ``version_dir``, never
    a symbolic link out of it. A manifest that names another index's file is a damaged index."""
    version_dir = Path(version_dir)
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise UniretError(f"{version_dir / 'manifest.json'}: names its {what} {name!r}, not a plain file name "
                          "inside the version; the index is damaged, rebuild it")
    path = version_dir / name
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UniretError(f"{path}: not a regular file inside the version (a link or a special file); the index "
                          "is damaged, rebuild it")
    return path


_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


def check_regular(path: Path, what: str) -> None:
    """Refuse a missing path, a symbolic link, a FIFO or a device where a version's file belongs
    (Faiss would follow a link out of the index, or block on a FIFO)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        state = "missing" if not path.exists() and not path.is_symlink() else "not a regular file"
        raise UniretError(f"{path}: {what} {state}; the index is damaged, rebuild it")


def check_index_shape(index, path: Path, manifest: dict | None) -> None:
    """A Faiss index whose dimension or count differ from its manifest's is another index's file."""
    if manifest is None:
        return
    if index.d != manifest["dim"] or index.ntotal != manifest["count"]:
        raise UniretError(f"{path}: a Faiss index of dimension {index.d} with {index.ntotal} vectors, the manifest "
                          f"says {manifest['dim']} and {manifest['count']}; the index is damaged, rebuild it")


#: Below this cosine similarity an item's new vector is other content, not numerical noise (the same
#: image embedded on another device or batch size stays above 0.9999).
SAME_CONTENT = 0.9995


def changed_content(ids: np.ndarray, vectors, old_ids: np.ndarray, new_vectors: np.ndarray) -> np.ndarray:
    """Bool per item already indexed (``old_ids``): is its new vector other content than the stored
    one (cosine below :data:`SAME_CONTENT`)? Re-adding the same store is no change."""
    rows = np.searchsorted(ids, old_ids)
    out = np.zeros(len(old_ids), dtype=bool)
    for start in range(0, len(rows), 65_536):
        part = slice(start, start + 65_536)
        old = np.asarray(vectors[rows[part]], dtype=np.float32)
        new = np.asarray(new_vectors[part]).astype(np.float16).astype(np.float32)
        norms = np.linalg.norm(old, axis=1) * np.linalg.norm(new, axis=1)
        cosine = np.einsum("ij,ij->i", old, new) / np.maximum(norms, 1e-12)
        out[part] = ~(cosine >= SAME_CONTENT)  # NaN counts as changed
    return out


def refuse_changed(root: Path, store_path: Path, changed_paths: list[str], on_disk: bool = False) -> None:
    """The one line for ``index add`` of items whose content changed at paths the index holds."""
    shown = ", ".join(changed_paths[:3]) + (", ..." if len(changed_paths) > 3 else "")
    way = ("remove them first (`uniret index remove` with their ids), then add" if on_disk else
           "pass --replace to replace them (their old ids are removed, the new content gets new ids)")
    raise UniretError(f"{store_path}: {len(changed_paths)} item(s) are indexed in {root} at the same domain, split "
                      f"and path with other content (e.g. {shown}); adding would keep the old vectors: {way}, "
                      "or index them under other paths")


def index_identity(manifest: dict) -> str:
    """Which index a version belongs to: the ``index_id`` a build gives it (kept by every add and
    remove), or for indexes built before it existed, a hash of their build record."""
    given = manifest.get("index_id")
    if isinstance(given, str) and given:
        return given
    history = manifest.get("history") or [{}]
    return "legacy-" + stable_hash([manifest.get("created"), manifest.get("git_commit"), history[0]])[:16]


def provenance(root: Path, version_dir: Path, manifest: dict) -> dict:
    """What an output computed on this version records so that a later command can check it."""
    return {"id": index_identity(manifest), "version": Path(version_dir).name, "path": str(Path(root).resolve())}


def check_provenance(root: Path, version_dir: Path, manifest: dict, given: dict | None, what: str) -> None:
    """Refuse ``what`` (ids computed by ``uniret dedup``) when it was made from another index, or from
    an older version of this one: its ids would name other items, or items that changed since."""
    if given is None:
        return
    if given.get("id") != index_identity(manifest):
        raise UniretError(f"{what} was made from another index ({given.get('path')}), not {root}; its ids name "
                          f"other items here: run `uniret dedup {root} --out` on this index")
    if given.get("version") != Path(version_dir).name:
        raise UniretError(f"{what} was made from version {given.get('version')} of {root}, which is now at "
                          f"{Path(version_dir).name}; re-run `uniret dedup {root} --out` on the current version")


def read_index(path: Path, manifest: dict | None = None):
    """The Faiss index file of a version; a damaged one, or one that does not match ``manifest``, is a
    one-line error (Faiss only reads its own format: nothing is unpickled)."""
    import faiss

    check_regular(path, "Faiss index")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        last = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "unreadable")
        raise UniretError(f"{path}: damaged Faiss index ({last[:160]}); rebuild the index") from None
    check_index_shape(index, path, manifest)
    return index


def load_ids_vectors(version_dir: Path, manifest: dict, mmap_ids: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``ids.npy`` (int64, ascending) and ``vectors.npy`` (memory-mapped) of a version, checked against
    each other and the manifest: never unpickled, never read past a truncated end."""
    ids = load_npy(version_dir / "ids.npy", mmap=mmap_ids, kinds="iu", what="index ids")
    vectors = load_npy(version_dir / "vectors.npy", mmap=True, kinds="f", what="index vectors")
    if ids.ndim != 1 or vectors.ndim != 2 or len(vectors) != len(ids) or vectors.shape[1] != manifest["dim"]:
        raise UniretError(f"{version_dir}: ids {ids.shape} and vectors {vectors.shape} do not match each other or "
                          f"the manifest (dim {manifest['dim']}); the index is damaged, rebuild it")
    return ids, vectors


def next_version_name(root: Path) -> str:
    numbers = [int(p.name[1:7]) for p in Path(root).glob("v[0-9]*") if p.name[1:7].isdigit()]
    return f"v{max(numbers, default=0) + 1:06d}"


@contextlib.contextmanager
def writer_lock(root: Path, create: bool = False) -> Iterator[None]:
    """One writer at a time per index directory (readers need no lock). Only a build may ``create``
    the directory: an update of a path that holds no index fails without making it."""
    root = Path(root)
    if create:
        root.mkdir(parents=True, exist_ok=True)
    elif not is_index_dir(root):
        current_version(root)  # the one-line "not an index directory" error
    with open(root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UniretError(f"{root}: another `uniret index` update is running; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clean_leftovers(root: Path, keep: Iterable[str]) -> None:
    """Remove unfinished versions and versions older than the ones in ``keep``."""
    keep = set(keep)
    for p in Path(root).glob("v[0-9]*"):
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def publish_version(root: Path, partial: Path) -> Path:
    """Rename ``partial`` to its final name and make it CURRENT; keep one previous version."""
    final = partial.with_name(partial.name.removesuffix(".partial"))
    previous = (root / CURRENT).read_text().strip() if (root / CURRENT).is_file() else None
    os.replace(partial, final)
    atomic_write_text(root / CURRENT, final.name + "\n")
    clean_leftovers(root, keep=[final.name] + ([previous] if previous else []))
    return final


_READ_ENVS: dict[tuple, object] = {}


def _read_env(path: Path):
    """One read-only environment per process and LMDB file: LMDB refuses a second open of the same
    file in one process. Published versions never change, so readers need no lock file."""
    import lmdb

    check_lmdb(path, "index metadata")
    st = (path / "data.mdb").stat()
    key = (os.getpid(), st.st_dev, st.st_ino)
    env = _READ_ENVS.get(key)
    if env is None:
        for old in [k for k in _READ_ENVS if k[0] != key[0]]:
            _READ_ENVS.pop(old)  # inherited through fork: not ours to use
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True, readahead=False, max_readers=512)
        _READ_ENVS[key] = env
    return env


class MetadataDB:
    """The id -> item LMDB of one version (read-only unless ``write=True``)."""

    def __init__(self, path: Path, write: bool = False):
        import lmdb

        self.path = Path(path)
        self.write = write
        if write:
            self.env = lmdb.open(str(self.path), map_size=LMDB_MAP_SIZE, subdir=True, readahead=False)
        else:
            self.env = _read_env(self.path)

    def close(self) -> None:
        if self.write:  # shared read environments stay open for the process
            self.env.close()

    def put_items(self, ids: np.ndarray, items: list[Item], batch: int = 10_000) -> None:
        for start in range(0, len(ids), batch):
            with self.env.begin(write=True) as txn:
                for i, item in zip(ids[start:start + batch], items[start:start + batch]):
                    txn.put(id_key(i), json.dumps({"id": int(i), **item.to_json()}).encode())
                    txn.put(item_key(item), str(int(i)).encode(), overwrite=False)

    def delete_ids(self, ids: Iterable[int]) -> None:
        with self.env.begin(write=True) as txn:
            for i in ids:
                raw = txn.get(id_key(i))
                if raw is None:
                    continue
                item = Item.from_json(self._item(raw))
                if txn.get(item_key(item)) == str(int(i)).encode():
                    txn.delete(item_key(item))
                txn.delete(id_key(i))

    def present(self, items: list[Item]) -> np.ndarray:
        """Bool per item: is an item with the same domain, split and path already indexed?"""
        with self.env.begin() as txn:
            return np.array([txn.get(item_key(it)) is not None for it in items], dtype=bool)

    def ids_of(self, items: list[Item]) -> np.ndarray:
        """The id indexed at each item's domain, split and path; -1 where none is."""
        with self.env.begin() as txn:
            found = [txn.get(item_key(it)) for it in items]
        return np.array([int(v) if v is not None else -1 for v in found], dtype=np.int64)

    def get(self, ids: Iterable[int]) -> list[dict | None]:
        with self.env.begin() as txn:
            out = []
            for i in ids:
                raw = txn.get(id_key(i)) if int(i) >= 0 else None
                out.append(self._item(raw) if raw is not None else None)
            return out

    def _item(self, raw: bytes) -> dict:
        """One stored item; JSON only (a value that is not, e.g. a planted pickle, is refused)."""
        try:
            item = parse_json(raw, "item")
        except ValueError:
            item = None
        if not isinstance(item, dict):
            raise UniretError(f"{self.path}: damaged metadata (a value is not a JSON item); rebuild the index")
        return item

    def copy_to(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self.env.copy(str(dest))
