"""Sharded embedding stores: parts + manifest read as one store, extra metadata columns, format-1
stores, the row view over parts, and `uniret store merge` / `store info` with their bad inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from uniret.cli import main
from uniret.data.collection import Item, ItemList
from uniret.embed.store import EmbeddingStore, part_name, write_store
from uniret.embed.store.writer import PartWriter, write_manifest
from uniret.errors import UniretError


def _items(n: int) -> list[Item]:
    extras = [{"url": f"https://example.org/{i}.jpg", "caption": f"thing {i}", "sku": i * 7,
               "tags": ["a", "b"][: i % 3]} if i % 5 else {"url": f"https://example.org/{i}.jpg"} for i in range(n)]
    return [Item(f"d/{i}.jpg", "shop", "index", i, (i % 4,), extras[i]) for i in range(n)]


def _vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_parts(root, items, x, parts: list[int], of: int, model_hash="h", failed=(), dim=8, dtype="float32",
                source_key="src"):
    """Write slices ``parts`` of ``of`` of (items, x) as a store or part directory at ``root``."""
    header = {"model_hash": model_hash, "source_key": source_key, "total": len(items)}
    whole = ItemList(items)
    entries = []
    for k in parts:
        part = whole.part(k, of)
        w = PartWriter(root / "parts" / part_name(k, of), part, k, of, dim, dtype, header)
        rows = np.arange(len(part))
        w.write(rows, x[part.start:part.start + len(part)])
        for i in failed:
            if part.start <= i < part.start + len(part):
                w.mark_failed(i - part.start, "cannot decode image (test)")
        w.checkpoint(rows)
        entries.append(w.finish())
    write_manifest(root, entries, dim, dtype, {"config_hash": model_hash}, {}, source_key, len(items), {"job": 1})
    return root


def test_sharded_store_reads_like_a_single_part_store(tmp_path):
    items, x = _items(23), _vectors(23)
    one = write_store(tmp_path / "one", x, items, model={"config_hash": "h"}, failed={6: "cannot decode image (test)"})
    many = EmbeddingStore(write_parts(tmp_path / "many", items, x, [0, 1, 2], 3, failed=[6]))
    assert len(many.parts) == 3 and [p.start for p in many.parts] == [0, 7, 15]
    assert many.count == one.count == 23 and many.dim == 8 and many.start == 0
    assert many.items == one.items == [Item(**{**it.__dict__}) for it in items]
    assert many.items[3].extra == {"url": "https://example.org/3.jpg", "caption": "thing 3", "sku": 21, "tags": []}
    assert many.columns == one.columns == ["url", "caption", "sku", "tags"]
    assert many.failed == one.failed == {"6": "cannot decode image (test)"}
    assert many.valid_mask.tolist() == one.valid_mask.tolist()
    dense = np.asarray(one.embeddings)
    assert not dense[6].any()
    np.testing.assert_array_equal(np.asarray(many.embeddings), dense)
    np.testing.assert_array_equal(many.read_rows(5, 17), dense[5:17])
    assert [i for i, _ in many.iter_items()] == list(range(23))


def test_row_view_indexes_like_an_array(tmp_path):
    items, x = _items(20), _vectors(20)
    view = EmbeddingStore(write_parts(tmp_path / "s", items, x, [0, 1, 2, 3], 4)).embeddings
    assert view.shape == (20, 8) and len(view) == 20 and view.dtype == np.float32
    ids = np.array([19, 0, 5, 5, 12, -1])
    mask = np.arange(20) % 3 == 0
    for key in (3, -2, slice(None), slice(2, 17), slice(4, 4), slice(1, 19, 4), ids, ids.reshape(2, 3), mask,
                (ids, slice(0, 4)), (7, 2)):
        np.testing.assert_array_equal(view[key], x[key])
    np.testing.assert_array_equal(np.asarray(view, dtype=np.float16), x.astype(np.float16))
    with pytest.raises(IndexError):
        view[20]


def test_format_1_stores_still_open(tmp_path):
    """A store written before parts existed: embeddings.npy + metadata.jsonl + failed in the manifest."""
    root = tmp_path / "old"
    root.mkdir()
    x = _vectors(4).astype(np.float16)
    np.save(root / "embeddings.npy", x)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": i, "path": f"{i}.png", "domain": "d", "split": "test", "position": i,
                                "class_ids": [i]}) + "\n")
    (root / "manifest.json").write_text(json.dumps({"format": "uniret-embeddings/1", "dim": 8, "count": 4,
                                                    "dtype": "float16", "model": {"config_hash": "h"},
                                                    "failed": {"2": "cannot decode"}}))
    store = EmbeddingStore(root)
    assert [it.path for it in store.items] == [f"{i}.png" for i in range(4)] and store.failed_ids.tolist() == [2]
    np.testing.assert_array_equal(store.embeddings, x)
    assert len(store.parts) == 1 and store.parts[0].start == 0


def test_store_merge_joins_parts_without_copying(tmp_path, capsys):
    items, x = _items(30), _vectors(30)
    a = write_parts(tmp_path / "a", items, x, [0], 2)
    b = write_parts(tmp_path / "b", items, x, [2, 3], 4, failed=[20])  # a finer split of the second half
    with pytest.raises(UniretError, match="only part of a store"):
        EmbeddingStore(a)
    assert main(["store", "merge", str(b), str(a), "--out", str(tmp_path / "m")]) == 0
    merged = EmbeddingStore(tmp_path / "m")
    one = write_store(tmp_path / "one", x, items, model={"config_hash": "h"}, failed={20: "x"})
    assert merged.items == one.items and merged.failed_ids.tolist() == [20]
    np.testing.assert_array_equal(np.asarray(merged.embeddings), np.asarray(one.embeddings))
    src = a / "parts" / part_name(0, 2) / "embeddings.npy"
    assert os.path.samefile(src, tmp_path / "m" / "parts" / part_name(0, 2) / "embeddings.npy")  # hard link
    capsys.readouterr()
    assert main(["store", "info", str(tmp_path / "m"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["slice"], r["first_id"], r["count"], r["failed"]) for r in rows] == \
        [("0/2", 0, 15, 0), ("2/4", 15, 7, 1), ("3/4", 22, 8, 0)]


@pytest.mark.parametrize("case", ["model", "dim", "overlap", "gap", "missing-file", "exists", "inside"])
def test_store_merge_refuses_bad_parts_with_one_line(tmp_path, capsys, case):
    items, x = _items(12), _vectors(12)
    a = write_parts(tmp_path / "a", items, x, [0], 2)
    second = {"model": dict(model_hash="other"), "dim": dict(dim=4)}.get(case, {})
    xb = _vectors(12, dim=second.get("dim", 8))
    b = write_parts(tmp_path / "b", items, xb, [1], 2, **second)
    args = [str(a), str(b)]
    out = tmp_path / "m"
    if case == "overlap":
        args.append(str(write_parts(tmp_path / "c", items, x, [1, 2], 4)))
    elif case == "gap":
        args = [str(a), str(write_parts(tmp_path / "c", items, x, [3], 4))]
    elif case == "missing-file":
        (b / "parts" / part_name(1, 2) / "embeddings.npy").unlink()
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "inside":
        out = a / "merged"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["store", "merge", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    expected = {"model": "model", "dim": "dim", "overlap": "overlap", "gap": "slice(s) 2/4",
                "missing-file": "missing part file", "exists": "non-empty directory", "inside": "inside"}[case]
    assert expected in err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written or removed
