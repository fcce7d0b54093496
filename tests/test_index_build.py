"""Index directories: auto key selection, recall of approximate indexes, add/remove alignment,
crash-safe updates (a real subprocess killed mid-`index add`), model mismatch."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from uniret.cli import main
from uniret.data.collection import Item
from uniret.embed.store import write_store
from uniret.errors import UniretError
from uniret.index.build import add_to_index, build_index, remove_from_index
from uniret.index.exact import exact_search
from uniret.index.keys import index_key, nlist_for, recall_at_k
from uniret.index.searcher import Searcher


def clustered(n, d=16, clusters=50, noise=0.35, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def items_for(n, start=0, domains=("a", "b")):
    return [Item(path=f"img{i}.png", domain=domains[i % len(domains)], split="test", position=i,
                 class_ids=(i % 5,)) for i in range(start, start + n)]


def make_store(path, x, items, model_hash="m1", failed=None):
    return write_store(path, x, items, model={"config_hash": model_hash, "backbone": "test"}, failed=failed)


def test_auto_key_selection_by_size():
    assert index_key("auto", 1000, 64) == "Flat"
    assert index_key("auto", 200_000, 64) == "Flat"
    assert index_key("auto", 1_000_000, 64) == "IVF4096,Flat"  # CPU: IVF beyond 200k
    assert index_key("auto", 1_000_000, 64, gpu=True) == "Flat"  # GPU: exact up to a few million
    assert index_key("auto", 5_000_000, 64, gpu=True) == "IVF8192,Flat"
    assert index_key("auto", 20_000_000, 64) == "IVF16384_HNSW32,Flat"
    # memory budget: flat fp32 (256 MB) does not fit 100 MB -> SQ8 (64 MB); 32 MB -> PQ
    assert index_key("auto", 1_000_000, 64, max_memory=100 * 2**20) == "IVF4096,SQ8"
    assert index_key("auto", 1_000_000, 64, max_memory=32 * 2**20) == "IVF4096,PQ16x8"
    assert index_key("auto", 1000, 64, max_memory=1000) == "IVF16,PQ16x4"
    assert index_key("hnsw", 10, 8) == "HNSW32"
    assert index_key("IVF32,Flat", 10, 8) == "IVF32,Flat"
    # 4*sqrt(N) as a power of two, >= 39 points per list
    assert nlist_for(10) == 1 and nlist_for(10_000) == 256 and nlist_for(1_000) == 16


def test_build_auto_small_is_flat_and_exact(tmp_path):
    x = clustered(600)
    store = make_store(tmp_path / "s", x, items_for(600), failed={"7": "unreadable"})
    build_index(store, tmp_path / "idx")
    s = Searcher.open(tmp_path / "idx")
    assert s.key == "Flat" and s.count == 599 and 7 not in s.ids
    assert s.manifest["recall"]["recall"] == 1.0 and s.manifest["model"]["config_hash"] == "m1"
    scores, ids = s.search(x[:20], 10)
    keep = np.flatnonzero(np.arange(600) != 7)
    x16 = x.astype(np.float16).astype(np.float32)  # the index holds the fp16 raw vectors
    ref_s, ref_rows = exact_search(x[:20], x16[keep], 10)
    np.testing.assert_array_equal(ids, keep[ref_rows])
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    assert s.metadata([ids[3, 0]])[0]["path"] == f"img{ids[3, 0]}.png"


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-sq8", "ivf-pq", "hnsw"])
def test_approximate_recall_against_exact(tmp_path, kind):
    x = clustered(2500, d=32, seed=1)
    store = make_store(tmp_path / "s", x, items_for(2500))
    build_index(store, tmp_path / "idx", kind=kind, target_recall=0.95, recall_k=20, tune_sample=200)
    s = Searcher.open(tmp_path / "idx")
    rec = s.manifest["recall"]
    assert rec["k"] == 20 and rec["recall"] >= 0.95, rec
    # held-out queries (not stored vectors) measured independently of the build's tuning
    xq = clustered(300, d=32, seed=1)[:, :] + 0.05 * np.random.default_rng(9).normal(size=(300, 32)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    _, truth = exact_search(xq, x, 20)
    _, found = s.search(xq, 20)
    assert recall_at_k(found, truth) >= 0.9


def test_ids_and_metadata_aligned_through_add_and_remove(tmp_path):
    x = clustered(500, seed=2)
    build_index(make_store(tmp_path / "a", x[:300], items_for(300)), tmp_path / "idx", kind="ivf-flat",
                recall_k=10, tune_sample=100)
    # store b: items 200..499; the first 100 are already indexed (same domain/split/path)
    res = add_to_index(tmp_path / "idx", make_store(tmp_path / "b", x[200:], items_for(300, start=200)))
    assert res["added"] == 200 and res["skipped_present"] == 100 and res["count"] == 500
    s = Searcher.open(tmp_path / "idx")
    assert s.ids.tolist() == list(range(500))  # new ids continue after the store's last row
    for i in (0, 299, 300, 499):
        assert s.metadata([i])[0]["path"] == f"img{i}.png"
        np.testing.assert_allclose(s.vectors_for([i])[0], x[i], atol=1e-3)
    _, top = s.search(x[[5, 350, 499]], 1)
    assert top[:, 0].tolist() == [5, 350, 499]
    # adding the same store again adds nothing and keeps the version
    again = add_to_index(tmp_path / "idx", tmp_path / "b")
    assert again["added"] == 0 and again["version"] == s.version_dir.name

    ids_file = tmp_path / "remove.txt"
    ids_file.write_text("# ids to drop\n5\n350\n99999\n")
    assert main(["index", "remove", str(tmp_path / "idx"), "--ids", str(ids_file), "--format", "json"]) == 0
    s = Searcher.open(tmp_path / "idx")
    assert s.count == 498 and 5 not in s.ids and 350 not in s.ids
    assert s.metadata([5, 350]) == [None, None] and s.metadata([6])[0]["path"] == "img6.png"
    _, top = s.search(x[[5, 350, 6]], 3)
    assert 5 not in top and 350 not in top and top[2, 0] == 6
    # re-adding the removed items gives them fresh ids, never reusing old ones
    res = add_to_index(tmp_path / "idx", tmp_path / "a")
    assert res["added"] == 1 and Searcher.open(tmp_path / "idx").ids[-1] == 500


def test_remove_from_hnsw_rebuilds(tmp_path):
    x = clustered(300, seed=3)
    build_index(make_store(tmp_path / "a", x, items_for(300)), tmp_path / "idx", kind="hnsw", recall_k=10)
    remove_from_index(tmp_path / "idx", [0, 1, 2])
    s = Searcher.open(tmp_path / "idx")
    _, top = s.search(x[:3], 5)
    assert s.count == 297 and not np.isin(top, [0, 1, 2]).any()
    _, top = s.search(x[10:13], 1)
    assert top[:, 0].tolist() == [10, 11, 12]


def test_killed_add_leaves_previous_index_usable(tmp_path):
    x = clustered(400, seed=4)
    idx = tmp_path / "idx"
    build_index(make_store(tmp_path / "a", x[:200], items_for(200)), idx)
    make_store(tmp_path / "b", x[200:], items_for(200, start=200))
    env = dict(os.environ, UNIRET_TEST_SLEEP_INDEX="60")
    code = "import sys; from uniret.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "index", "add", str(idx), str(tmp_path / "b")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not list(idx.glob("*.partial/manifest.json")):  # everything written, not yet published
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    s = Searcher.open(idx)
    assert s.count == 200 and s.version_dir.name == "v000001"
    _, top = s.search(x[:2], 1)
    assert top[:, 0].tolist() == [0, 1]
    # the next update cleans the leftover and succeeds
    assert add_to_index(idx, tmp_path / "b")["count"] == 400
    assert not list(idx.glob("*.partial")) and Searcher.open(idx).count == 400


def test_rerun_after_an_interrupted_first_build(tmp_path):
    x = clustered(100, seed=8)
    make_store(tmp_path / "s", x, items_for(100))
    (tmp_path / "idx" / "v000001.partial").mkdir(parents=True)  # what a killed first build leaves
    (tmp_path / "idx" / ".lock").touch()
    build_index(tmp_path / "s", tmp_path / "idx")
    assert Searcher.open(tmp_path / "idx").count == 100 and not list((tmp_path / "idx").glob("*.partial"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").touch()
    with pytest.raises(UniretError, match="not an index directory"):
        build_index(tmp_path / "s", tmp_path / "other")


def test_model_mismatch_is_a_clear_error(tmp_path, capsys):
    x = clustered(100, seed=5)
    build_index(make_store(tmp_path / "a", x, items_for(100)), tmp_path / "idx")
    make_store(tmp_path / "other", x, items_for(100, start=100), model_hash="m2")
    with pytest.raises(UniretError, match="embedded by model m2"):
        add_to_index(tmp_path / "idx", tmp_path / "other")
    assert main(["index", "add", str(tmp_path / "idx"), str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0]
    with pytest.raises(UniretError, match="built from model m1"):
        Searcher.open(tmp_path / "idx").check_model("m2")


def test_cli_build_info_and_bad_options(tmp_path, capsys):
    x = clustered(300, seed=6)
    make_store(tmp_path / "s", x, items_for(300))
    assert main(["index", "build", str(tmp_path / "s"), "--out", str(tmp_path / "idx"), "--kind", "ivf-flat",
                 "--gpu", "auto", "--target-recall", "0.9", "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert '"key": "IVF4,Flat"' in out
    assert main(["index", "info", str(tmp_path / "idx")]) == 0
    assert "IVF4,Flat" in capsys.readouterr().out
    for argv, msg in [
        (["index", "build", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--kind", "bogus"], "Faiss factory"),
        (["index", "build", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--max-memory", "lots"], "--max-memory"),
        (["index", "build", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--target-recall", "1.5"], "target-recall"),
        (["index", "info", str(tmp_path / "nothing")], "not an index directory"),
        (["index", "remove", str(tmp_path / "idx"), "--ids", str(tmp_path / "none.txt")], "no such file"),
    ]:
        assert main(argv) in (1, 2)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus()


@pytest.mark.gpu
@pytest.mark.skipif(_faiss_gpus() == 0, reason="Faiss sees no GPU")
@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_faiss_gpu_build_and_search_equal_cpu(tmp_path, kind):
    x = clustered(5000, d=32, seed=7)
    store = make_store(tmp_path / "s", x, items_for(5000))
    build_index(store, tmp_path / "gpu", kind=kind, gpu="on", recall_k=20)
    build_index(store, tmp_path / "cpu", kind=kind, gpu="off", recall_k=20)
    g, c = Searcher.open(tmp_path / "gpu"), Searcher.open(tmp_path / "cpu", gpu="off")
    assert g.manifest["built_on"].endswith("GPU(s)")
    _, gi = g.search(x[:200], 20)
    _, ci = c.search(x[:200], 20)
    assert recall_at_k(gi, ci) > 0.95 if kind != "flat" else (gi == ci).mean() > 0.999
