"""The Python API's write side: indexes from arrays (own ids + metadata), folders and stores; add and
remove through an open Index; embed_images; Results.to_pandas."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from folders import make_photo_folder

import uniret
from uniret.cli import main
from uniret.errors import UniretError, UsageError


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_array_index_with_ids_metadata_add_remove(tmp_path):
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(50, 8)))
    ids = np.arange(50)[::-1] * 10 + 7  # own ids, not in order
    meta = [{"title": f"doc {i}", "price": float(i % 7), "domain": "shop" if i % 2 else "blog"} for i in range(50)]
    uniret.build_index(vectors, tmp_path / "idx", ids=ids, metadata=meta)
    index = uniret.open_index(tmp_path / "idx")
    assert index.count == 50
    res = index.search([vectors[3]], k=3)
    top = res[0].rows[0]
    assert top["id"] == ids[3] and top["title"] == "doc 3" and top["domain"] == "shop" and top["score"] > 0.999
    filtered = index.search([vectors[3]], k=5, where=["price < 2", "domain == 'blog'"])[0].rows
    assert len(filtered) == 5 and all(r["price"] < 2 and r["domain"] == "blog" for r in filtered)
    # add vectors: new ids after the largest; remove by id; the open index follows
    added = index.add(unit(rng.normal(size=(2, 8))), metadata=[{"title": "new a"}, {"title": "new b"}])
    assert added["added"] == 2 and added["ids"] == [498, 499]
    assert index.count == 52 and index.item(499)["title"] == "new b"
    removed = index.remove([ids[3], 12345])
    assert removed == {"removed": 1, "not_present": 1, "count": 51, "version": "v000003"}
    assert index.search([vectors[3]], k=1)[0].rows[0]["id"] != ids[3]
    with pytest.raises(UsageError, match="unique non-negative"):
        uniret.build_index(vectors, tmp_path / "bad", ids=np.zeros(50, int))
    with pytest.raises(UsageError, match="one dict per row"):
        uniret.build_index(vectors, tmp_path / "bad", metadata=meta[:3])
    assert not (tmp_path / "bad").exists()


def test_folder_index_and_embed_images(tmp_path):
    assert main(["model", "init", "--backbone", "timm:test_resnet", "--image-size", "64", "--out",
                 str(tmp_path / "m")]) == 0
    twins = make_photo_folder(tmp_path / "photos", per_class=2)
    uniret.build_index(tmp_path / "photos", tmp_path / "idx", model=tmp_path / "m")
    index = uniret.open_index(tmp_path / "idx")
    vectors = uniret.embed_images([tmp_path / "photos" / twins["phone"], tmp_path / "photos" / twins["twin"]],
                                  model=tmp_path / "m")
    assert vectors.shape == (2, 64) and vectors.dtype == np.float32
    assert float(vectors[0] @ vectors[1]) > 0.99  # the sideways phone photo is embedded upright
    folder = uniret.embed_images(tmp_path / "photos", model=tmp_path / "m")
    assert folder.shape == (8, 64)
    results = index.search([str(tmp_path / "photos" / twins["twin"])], k=2, where="label == 'cat'")
    assert {r["path"] for r in results[0].rows} == {twins["phone"], twins["twin"]}
    assert index.image_bytes(results[0].rows[0]["id"])  # pictures without images=
    with pytest.raises(UniretError, match="no such image file"):
        uniret.embed_images(["nope.jpg"], model=tmp_path / "m")


def test_to_pandas(tmp_path, monkeypatch):
    vectors = unit(np.random.default_rng(2).normal(size=(6, 4)))
    uniret.build_index(vectors, tmp_path / "idx", metadata=[{"label": "x"}] * 6)
    results = uniret.open_index(tmp_path / "idx").search([vectors[0], vectors[1]], k=2)
    try:
        import pandas  # noqa: F401
    except ImportError:
        pass
    else:
        frame = results.to_pandas()
        assert list(frame["id"]) == [r["id"] for r in results.rows()] and len(frame) == 4
        assert set(["query", "rank", "id", "score", "label"]) <= set(frame.columns)
    monkeypatch.setitem(sys.modules, "pandas", None)  # pandas not installed: one line saying so
    with pytest.raises(UniretError, match="needs pandas: pip install pandas"):
        results.to_pandas()
