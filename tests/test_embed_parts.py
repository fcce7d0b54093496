"""Embedding in parts through the real CLI: `--part I/N` + `store merge` equal to one run, resume of a
part after SIGKILL, bad `--part` values, webdataset shards as input (corrupt members skipped and
listed), and extra metadata fields from the input records to the store, the index and search."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from shards import member, write_shards

from uniret.cli import main
from uniret.data import open_collection, open_items
from uniret.embed.store import EmbeddingStore, part_name


@pytest.fixture(scope="module")
def one_store(model_dir, demo_root, tmp_path_factory):
    """The reference: the demo's test split embedded by one process in one run."""
    out = tmp_path_factory.mktemp("one") / "store"
    assert embed(model_dir, demo_root, out, "--split", "test") == 0
    return EmbeddingStore(out)


def embed(model_dir, data, out, *more) -> int:
    return main(["embed", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--workers", "0",
                 "--batch-size", "8", "--dtype", "float32", "--device", "cpu", *more])


def assert_same_store(a: EmbeddingStore, b: EmbeddingStore) -> None:
    assert a.count == b.count and a.items == b.items and a.failed == b.failed
    np.testing.assert_allclose(np.asarray(a.embeddings), np.asarray(b.embeddings), atol=1e-5)


def test_parts_merged_equal_one_run(model_dir, demo_root, one_store, tmp_path, caplog):
    for spec in ("0/2", "2/4", "3/4"):  # the second half in a finer split: the same rows
        assert embed(model_dir, demo_root, tmp_path / spec.replace("/", "of"), "--split", "test", "--part", spec) == 0
    half = EmbeddingStore(tmp_path / "0of2", whole=False)
    assert (half.start, half.count) == (0, 23) and half.manifest["kind"] == "part"
    assert main(["store", "merge", str(tmp_path / "3of4"), str(tmp_path / "0of2"), str(tmp_path / "2of4"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = EmbeddingStore(tmp_path / "merged")
    assert [p.name for p in merged.parts] == [part_name(0, 2), part_name(2, 4), part_name(3, 4)]
    assert_same_store(merged, one_store)
    # a re-run of a finished part embeds nothing
    with caplog.at_level("INFO", logger="uniret"):
        assert embed(model_dir, demo_root, tmp_path / "0of2", "--split", "test", "--part", "0/2") == 0
    assert "nothing to do" in caplog.text


@pytest.mark.parametrize("spec", ["3/2", "0/0", "a/b", "-1/2", "2"])
def test_bad_part_values_are_one_line_errors(model_dir, demo_root, tmp_path, capsys, spec):
    assert embed(model_dir, demo_root, tmp_path / "p", "--part", spec) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --part"), err
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


def test_part_resumes_after_sigkill(model_dir, demo_root, one_store, tmp_path, caplog):
    out = tmp_path / "p1"
    cmd = [sys.executable, "-m", "uniret.cli", "embed", "--model", str(model_dir), "--data", str(demo_root),
           "--out", str(out), "--split", "test", "--part", "1/2", "--workers", "0", "--batch-size", "1",
           "--dtype", "float32", "--device", "cpu"]
    env = dict(os.environ, UNIRET_TEST_SLEEP_EMBED="30", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / "p1.partial" / "parts" / f"{part_name(1, 2)}.partial" / "done.npy"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (done.is_file() and np.load(done).any()):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.2)
        assert np.load(done).sum() == 20  # the first checkpoint (20 batches of 1), then it sleeps
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    with caplog.at_level("INFO", logger="uniret"):
        assert embed(model_dir, demo_root, out, "--split", "test", "--part", "1/2") == 0
    assert "resuming part 1 of 2: 20 of 23 rows already embedded" in caplog.text
    part = EmbeddingStore(out, whole=False)
    assert part.items == one_store.items[23:]
    np.testing.assert_allclose(np.asarray(part.embeddings), np.asarray(one_store.embeddings)[23:], atol=1e-5)


def test_webdataset_shards_in_parts_with_corrupt_members(model_dir, tmp_path, capsys, caplog):
    paths = write_shards(tmp_path / "shards", shards=3, per_shard=5)
    data = bytearray(paths[1].read_bytes())  # shard 1: sample 2's image header is garbage
    head = member(paths[1], "000010002.jpg").offset
    data[head:head + 64] = b"\xff" * 64
    paths[1].write_bytes(bytes(data))
    data = bytearray(paths[2].read_bytes())  # shard 2: sample 0's image bytes do not decode
    jpg = member(paths[2], "000020000.jpg")
    data[jpg.offset_data:jpg.offset_data + 32] = b"\0" * 32
    paths[2].write_bytes(bytes(data))
    spec = str(tmp_path / "shards" / "{00000..00002}.tar")
    with caplog.at_level("WARNING", logger="uniret"):
        assert embed(model_dir, spec, tmp_path / "whole") == 0
    whole = EmbeddingStore(tmp_path / "whole")
    assert whole.count == 14 and "00001.tar/000010002.jpg" not in [it.path for it in whole.items]
    assert any("corrupt tar header" in n for n in whole.notes) and "input problems skipped" in caplog.text
    assert list(whole.failed) == ["9"] and whole.items[9].path == "00002.tar/000020000.jpg"  # 5 + 4 samples before
    assert whole.columns == ["url", "key", "width", "meta_id", "txt"]
    assert whole.items[0].extra["txt"] == "a photo of thing 000000000"
    # parts take whole shards (never one shard in two parts) and merge into the same store
    for k in range(2):
        assert embed(model_dir, spec, tmp_path / f"p{k}", "--part", f"{k}/2") == 0
    shards = [EmbeddingStore(tmp_path / f"p{k}", whole=False).parts[0].info["span"]["shards"] for k in range(2)]
    assert shards == [[0, 1, 3], [1, 3, 3]]
    assert main(["store", "merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "m")]) == 0
    assert_same_store(EmbeddingStore(tmp_path / "m"), whole)
    # the extra fields reach the index's metadata and the search results
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(tmp_path / "idx"), "--model", str(model_dir)]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "id:3", "--k", "14", "--format", "json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert (rows[3]["url"], rows[3]["txt"], rows[3]["meta_id"]) == ("https://example.org/000000003",
                                                                    "a photo of thing 000000003", 3)
    from uniret.index.api import open_index

    rows = open_index(tmp_path / "idx").search(["id:12"], k=14).to_dicts()[0]["results"]
    assert {r["id"]: r["key"] for r in rows}[12] == "000020003"  # 5 + 4 + 3: shard 2's fourth sample


def test_collection_records_carry_extra_fields(tmp_path, demo_root, model_dir):
    """Fields of a collection's JSON records beyond path and class_id travel into items, packed stores
    and embedding stores (a record's own ``id`` is kept as ``meta_id``)."""
    root = tmp_path / "c"
    (root / "info" / "shop").mkdir(parents=True)
    records = json.loads((demo_root / "info" / "shapes" / "test.json").read_text())
    for i, rec in enumerate(records):
        (root / "images" / rec["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_root / "images" / rec["path"], root / "images" / rec["path"])
        rec.update(url=f"https://shop.example/{i}", sku=1000 + i, id=f"A{i}")
    (root / "info" / "shop" / "test.json").write_text(json.dumps(records))
    items = open_items(root)
    assert items[2].extra == {"url": "https://shop.example/2", "sku": 1002, "meta_id": "A2"}
    assert main(["data", "pack", str(root), str(tmp_path / "c.lmdb")]) == 0
    assert open_collection(tmp_path / "c.lmdb").items()[2].extra == items[2].extra
    assert embed(model_dir, tmp_path / "c.lmdb", tmp_path / "s") == 0
    store = EmbeddingStore(tmp_path / "s")
    assert store.columns == ["url", "sku", "meta_id"] and store.items[5].extra["sku"] == 1005
