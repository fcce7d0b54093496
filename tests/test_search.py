"""Searcher and `uniret search` / `uniret dedup`: image queries on the demo collection, domain filter,
reranking through the index, the Matryoshka funnel, near-duplicates, the GPU path."""

import json

import numpy as np
import pytest
import torch

from uniret.cli import main
from uniret.data.collection import Item
from uniret.embed.store import EmbeddingStore, write_store
from uniret.index.build import build_index
from uniret.index.dedup import find_duplicates
from uniret.index.exact import exact_search
from uniret.index.keys import recall_at_k
from uniret.index.rerank import superglobal
from uniret.index.searcher import Searcher


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def demo_index(demo_root, tmp_path_factory):
    """Model -> store -> index of the demo collection through the real CLI, as in the README."""
    tmp = tmp_path_factory.mktemp("demo_index")
    assert main(["model", "init", "--backbone", "timm:vit_tiny_patch16_224", "--out", str(tmp / "model"),
                 "--dim", "16", "--nested-dims", "8", "--image-size", "32"]) == 0
    assert main(["embed", "--model", str(tmp / "model"), "--data", str(demo_root), "--out", str(tmp / "store"),
                 "--split", "test", "--split", "index", "--workers", "0", "--device", "cpu", "--batch-size", "64"]) == 0
    assert main(["index", "build", str(tmp / "store"), "--out", str(tmp / "index"), "--model", str(tmp / "model")]) == 0
    return tmp


def test_search_by_image_file_folder_id_and_npy(demo_index, demo_root, capsys):
    tmp = demo_index
    store = EmbeddingStore(tmp / "store")
    target = 7
    image = demo_root / "images" / store.items[target].path
    capsys.readouterr()
    assert main(["search", str(tmp / "index"), str(image), "--k", "3", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    top = rows[0]
    assert top["id"] == target and top["score"] > 0.999  # the image finds itself, no --model needed
    assert top["path"] == store.items[target].path and top["domain"] == store.items[target].domain
    assert top["class_id"] == store.items[target].class_ids[0]
    # id:N and a .npy of the stored vectors give the same ranking as the image query
    np.save(tmp / "q.npy", np.asarray(store.embeddings[[target]], dtype=np.float32))
    assert main(["search", str(tmp / "index"), f"id:{target}", str(tmp / "q.npy"), "--k", "3", "--format", "json"]) == 0
    rows2 = json.loads(capsys.readouterr().out)["rows"]
    assert [r["id"] for r in rows2[:3]] == [r["id"] for r in rows] == [r["id"] for r in rows2[3:]]
    # a folder of images: one result block per image
    folder = image.parent
    n_images = len([p for p in folder.iterdir() if p.suffix == ".png"])
    assert main(["search", str(tmp / "index"), str(folder), "--k", "2", "--format", "json"]) == 0
    rows3 = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows3) == 2 * n_images
    # table output has the documented columns
    assert main(["search", str(tmp / "index"), f"id:{target}", "--k", "2"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["query", "rank", "id", "score", "path", "domain", "class_id"]


def test_search_errors_are_one_line(demo_index, tmp_path, capsys):
    idx = str(demo_index / "index")
    bad_npy = tmp_path / "bad.npy"
    np.save(bad_npy, np.zeros((2, 5), np.float32))
    other_model = tmp_path / "other_model"
    assert main(["model", "init", "--backbone", "timm:vit_tiny_patch16_224", "--out", str(other_model),
                 "--dim", "16", "--image-size", "32", "--seed", "1"]) == 0
    capsys.readouterr()
    for argv, msg in [
        (["search", idx, "id:999999"], "not in the index"),
        (["search", idx, "id:abc"], "id:<integer>"),
        (["search", idx, str(tmp_path / "missing.jpg")], "not an image file"),
        (["search", idx, str(bad_npy)], "holds 16-d vectors"),
        (["search", idx, "id:1", "--domain", "nope"], "no items in this index"),
        (["search", idx, "id:1", "--shortlist-k", "5"], "--shortlist-dim"),
        (["search", idx, "id:1", "--model", str(other_model)], "built from model"),
    ]:
        assert main(argv) in (1, 2), argv
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("loading model ")]
        assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0], (argv, err)
    # a bad choice is a click usage error: exit 2, the choices named, no traceback
    assert main(["search", idx, "id:1", "--rerank", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "superglobal" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A nested-dims store: the first 8 dims carry most of the signal (like a Matryoshka model)."""
    tmp = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    n, d = 3000, 32
    centers = rng.normal(size=(60, d)) * np.r_[np.full(8, 3.0), np.full(24, 1.0)]
    x = unit(centers[rng.integers(0, 60, n)] + 0.4 * rng.normal(size=(n, d)))
    items = [Item(path=f"{i}.png", domain="ab"[i % 2], split="test", position=i, class_ids=(i % 3,)) for i in range(n)]
    write_store(tmp / "store", x, items, model={"config_hash": "h", "nested_dims": [8, 16, 32]})
    build_index(tmp / "store", tmp / "flat", kind="flat")
    return tmp, x


def test_domain_filter_equals_exact_on_the_domain(synthetic):
    tmp, x = synthetic
    s = Searcher.open(tmp / "flat")
    xq = x[:10]
    _, ids = s.search(xq, 5, domain="b")
    rows_b = np.arange(1, len(x), 2)
    x16 = x.astype(np.float16).astype(np.float32)  # what the index holds
    _, ref = exact_search(xq, x16[rows_b], 5)
    np.testing.assert_array_equal(ids, rows_b[ref])
    assert all(m["domain"] == "b" for m in s.metadata(ids))


def test_rerank_through_searcher_equals_direct_call(synthetic):
    tmp, x = synthetic
    s = Searcher.open(tmp / "flat")
    xq = x[:6]
    scores, ids = s.search(xq, 400)
    vec = s.vectors_for
    ref_s, ref_i = superglobal(xq, vec, ids, scores)
    got_s, got_i = s.search(xq, 10, rerank="superglobal")
    np.testing.assert_array_equal(got_i, ref_i[:, :10])
    np.testing.assert_allclose(got_s, ref_s[:, :10], atol=1e-5)
    _, aqe_i = s.search(xq, 10, rerank="aqe")
    assert aqe_i.shape == (6, 10) and (aqe_i >= 0).all()


def test_matryoshka_funnel(synthetic):
    tmp, x = synthetic
    s = Searcher.open(tmp / "flat")
    xq = x[::30]
    full_s, full_i = s.search(xq, 10)
    # a shortlist as long as the index is exact
    f_s, f_i = s.search(xq, 10, shortlist_dim=8, shortlist_k=len(x))
    np.testing.assert_array_equal(f_i, full_i)
    np.testing.assert_allclose(f_s, full_s, atol=1e-5)
    # a short shortlist from the 8-d prefix keeps most of the full-dim top 10
    _, f_i = s.search(xq, 10, shortlist_dim=8, shortlist_k=200)
    assert recall_at_k(f_i, full_i) >= 0.9
    _, tiny = s.search(xq, 10, shortlist_dim=2, shortlist_k=10)
    assert recall_at_k(tiny, full_i) < recall_at_k(f_i, full_i)


def test_dedup_finds_planted_duplicates(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = unit(rng.normal(size=(200, 16)))
    x[50] = unit(x[10] + 0.01 * rng.normal(size=16))  # near-copy of 10
    x[120] = unit(x[10] + 0.01 * rng.normal(size=16))  # and another
    x[199] = x[3]  # exact copy of 3
    items = [Item(path=f"{i}.png", domain="d", split="test", position=i) for i in range(200)]
    write_store(tmp_path / "s", x, items, model={"config_hash": "h"})
    build_index(tmp_path / "s", tmp_path / "idx")
    res = find_duplicates(Searcher.open(tmp_path / "idx"), threshold=0.99)
    assert res["groups"] == [[3, 199], [10, 50, 120]]
    assert res["keep"] == [3, 10] and res["remove"] == [199, 50, 120]
    out = tmp_path / "dups.json"
    assert main(["dedup", str(tmp_path / "idx"), "--fraction", "0.025", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["groups"] == [[3, 199], [10, 50, 120]]  # 5 of 200 items
    assert "2 group(s)" in capsys.readouterr().out
    assert main(["dedup", str(tmp_path / "idx"), "--threshold", "0.9", "--fraction", "0.1"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_gpu_searcher_equals_cpu(synthetic):
    tmp, x = synthetic
    cpu = Searcher.open(tmp / "flat", gpu="off")
    gpu = Searcher.open(tmp / "flat", device="cuda")
    xq = x[:100]
    c_s, c_i = cpu.search(xq, 50)
    g_s, g_i = gpu.search(xq, 50)
    assert (g_i == c_i).mean() > 0.999
    np.testing.assert_allclose(g_s, c_s, atol=1e-3)
    r_c = cpu.search(xq, 10, rerank="superglobal")[1]
    r_g = gpu.search(xq, 10, rerank="superglobal")[1]
    assert (r_c == r_g).mean() > 0.99


TOY_RERANKER = '''
import numpy as np

from uniret.index.rerank import RERANKERS, Reranker


def reverse(xq, xb, ids, scores, M=6):
    """A toy reranker: the first M candidates in reverse order (scores negated, so still descending)."""
    ids, scores = np.array(ids), np.array(scores)
    ids[:, :M], scores[:, :M] = ids[:, :M][:, ::-1], -scores[:, :M][:, ::-1]
    return scores, ids


RERANKERS["toy"] = Reranker(reverse, 6, "reverse the top 6")
'''


def test_a_registered_reranker_reaches_search_and_eval(demo_index, demo_root, tmp_path, monkeypatch):
    """Adding a reranker is one registry entry: the CLI choices, Searcher and eval all pick it up."""
    import subprocess
    import sys

    idx, model, cache = demo_index / "index", demo_index / "model", tmp_path / "cache"
    runs = [["search", str(idx), "id:3", "--k", "3", "--rerank", "toy", "--format", "json"],
            ["eval", "--model", str(model), "--data", str(demo_root), "--rerank", "toy", "--out", str(tmp_path / "r"),
             "--cache-dir", str(cache), "--device", "cpu"]]
    script = TOY_RERANKER + f"import sys\nfrom uniret.cli import main\nsys.exit(max(main(a) for a in {runs!r}))\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = [row["id"] for row in json.loads(r.stdout[: r.stdout.index("\n}\n") + 3])["rows"]]
    # the same through the Python API, with the reranker registered in this process
    namespace = {}
    exec(TOY_RERANKER.replace('RERANKERS["toy"] =', "toy ="), namespace)
    from uniret.index.rerank import RERANKERS

    monkeypatch.setitem(RERANKERS, "toy", namespace["toy"])
    searcher = Searcher.open(idx)
    _, plain = searcher.search(searcher.vectors_for([3]), 6)
    _, toy = searcher.search(searcher.vectors_for([3]), 3, rerank="toy")
    assert got == toy[0].tolist() == plain[0, ::-1][:3].tolist()
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["rerank"] == "toy"
    from uniret.eval import evaluate

    again = evaluate(model, demo_root, rerank="toy", cache_dir=cache, device="cpu")
    plain_eval = evaluate(model, demo_root, cache_dir=cache, device="cpu")
    assert again["embeddings"]["reused"] and again["results"] == report["results"]
    assert again["results"]["merged"]["mean"] != plain_eval["results"]["merged"]["mean"]
