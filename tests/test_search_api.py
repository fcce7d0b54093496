"""The search layer (`uniret.open_index`) and the thin `uniret search` / `uniret dedup` / `index remove`
on top of it: mixed queries, Results, HTML pages, live refresh, and every bad input as one line."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

import uniret
from uniret.cli import main
from uniret.data.collection import Item
from uniret.embed.store import EmbeddingStore, write_store
from uniret.errors import UniretError
from uniret.index.build import add_to_index, build_index


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def one_line_error(capsys, argv, expected_code=(1, 2)) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code in expected_code, (argv, code, err)
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0], (argv, err)
    return err[0]


@pytest.fixture(scope="module")
def opened(image_index, demo_root):
    return uniret.open_index(image_index / "index", images=demo_root)


def test_mixed_queries_agree(opened, image_index, demo_root, tmp_path):
    store = EmbeddingStore(image_index / "store")
    target = 5
    path = demo_root / "images" / store.items[target].path
    data = path.read_bytes()
    vec = np.asarray(store.embeddings[target], dtype=np.float32)
    np.save(tmp_path / "q.npy", vec[None])
    res = opened.search([str(path), Image.open(io.BytesIO(data)), data, target, f"id:{target}", vec,
                         str(tmp_path / "q.npy")], k=4)
    assert len(res) == 7
    first = [q.rows[0] for q in res]
    assert all(r["id"] == target and r["score"] > 0.999 for r in first), first
    ids = [[r["id"] for r in q.rows] for q in res]
    assert all(i == ids[0] for i in ids)
    assert res[0].query == str(path) and res[3].query == f"id:{target}"
    assert res[6].query == f"{tmp_path / 'q.npy'}[0]"
    row = res[0].rows[0]
    assert row["path"] == store.items[target].path and row["domain"] == store.items[target].domain
    assert row["class_ids"] == list(store.items[target].class_ids) and row["rank"] == 1
    dicts = res.to_dicts()
    assert dicts[0]["query"] == str(path) and dicts[0]["results"][0]["id"] == target
    assert json.loads(res.to_json()) == dicts
    # a 2-d array is one query per row
    assert len(opened.search(np.asarray(store.embeddings[:3], dtype=np.float32), k=2)) == 3


def test_k_threshold_domain_and_rerank(opened):
    n = opened.count
    assert len(opened.search("id:0", k=100_000_000)[0].rows) == n  # clamped to the index size
    median = float(np.median([r["score"] for r in opened.search("id:0", k=n)[0].rows]))
    rows = opened.search("id:0", k=n, threshold=median)[0].rows
    assert rows and all(r["score"] >= median for r in rows) and len(rows) <= n // 2 + 1
    flags = opened.search("id:0", k=5, domain="flags")[0].rows
    assert {r["domain"] for r in flags} == {"flags"}
    reranked = opened.search("id:0", k=5, rerank="superglobal")[0].rows
    assert len(reranked) == 5
    for kwargs, msg in [({"k": 0}, "k must be"), ({"k": 2.5}, "k must be"), ({"rerank": "bogus"}, "unknown reranker"),
                        ({"domain": "nope"}, "no items"), ({"threshold": 3.0}, "threshold")]:
        with pytest.raises(UniretError, match=msg):
            opened.search("id:0", **kwargs)


def test_bad_queries_are_refused(opened, tmp_path):
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    cases = [
        (np.full(16, np.nan, np.float32), "NaN or infinite"),
        (np.full((1, 16), np.inf, np.float32), "NaN or infinite"),
        (np.zeros((1, 5), np.float32), "16-d"),
        (str(tmp_path / "strings.npy"), "expected numbers"),
        ("id:2.7", "id:<integer>"), ("id:true", "id:<integer>"), ("id:-1", "id:<integer>"),
        ("id:99999999999999999999999", "id:<integer>"), (True, "id:<integer>"), (10**9, "not in the index"),
        (b"not an image", "not an image uniret can read"), (bomb_png(), "decompression bomb"),
        (str(truncated), "truncated"), (str(tmp_path / "bomb.png"), "decompression bomb"),
        (str(tmp_path / "missing.png"), "not an image file"), ("/dev/null", "not a regular file"),
    ]
    for query, msg in cases:
        with pytest.raises(UniretError, match=msg):
            opened.search(query, k=3)


def test_no_torch_for_id_and_npy_queries(image_index, tmp_path):
    np.save(tmp_path / "q.npy", np.ones((1, 16), np.float32))
    code = ("import sys; from uniret.cli import main; "
            f"rc = main(['search', {str(image_index / 'index')!r}, 'id:3', {str(tmp_path / 'q.npy')!r}, '--domain', 'flags']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "id:3" in done.stdout


@pytest.fixture()
def hostile_index(tmp_path):
    """An index whose paths and domains are HTML, with two planted duplicates."""
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(40, 8)))
    x[7] = unit(x[2] + 0.001)
    domains = ["<img src=x onerror=alert(1)>", "plain"]
    items = [Item(path=f"<script>alert({i})</script>.png", domain=domains[i % 2], split="test", position=i)
             for i in range(40)]
    write_store(tmp_path / "store", x, items, model={"config_hash": "h"})
    build_index(tmp_path / "store", tmp_path / "index")
    return tmp_path, x


def test_html_pages_escape_everything(hostile_index, capsys):
    tmp, _ = hostile_index
    assert main(["search", str(tmp / "index"), "id:2", "--k", "3", "--html", str(tmp / "s.html")]) == 0
    page = (tmp / "s.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(2)&lt;/script&gt;.png" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert uniret.open_index(tmp / "index").search("id:2", k=2)._repr_html_().count("<script>") == 0
    assert main(["dedup", str(tmp / "index"), "--threshold", "0.99", "--out", str(tmp / "d.json"),
                 "--html", str(tmp / "d.html")]) == 0
    page = (tmp / "d.html").read_text()
    assert "1 group(s)" in page and "<script>alert" not in page and "&lt;script&gt;alert(7)" in page
    # the dedup output feeds `index remove --ids` directly
    assert json.loads((tmp / "d.json").read_text())["remove"] == [7]
    capsys.readouterr()
    assert main(["index", "remove", str(tmp / "index"), "--ids", str(tmp / "d.json"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["removed"] == 1


def test_search_page_has_thumbnails(image_index, demo_root, tmp_path):
    image = next((demo_root / "images").rglob("*.png"))
    assert main(["search", str(image_index / "index"), str(image), "id:1", "--k", "4", "--images", str(demo_root),
                 "--html", str(tmp_path / "out.html")]) == 0
    page = (tmp_path / "out.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 * (1 + 4)  # two queries, each with 4 results
    assert str(image) in page  # the query column shows the full path


def test_cli_bounds_are_one_line(hostile_index, capsys, tmp_path):
    tmp, _ = hostile_index
    idx = str(tmp / "index")
    (tmp_path / "float.txt").write_text("1\n2.7\n")
    (tmp_path / "bool.json").write_text("[1, true]")
    (tmp_path / "obj.json").write_text('{"groups": []}')
    np.save(tmp_path / "float.npy", np.array([1.0, 2.0]))
    np.save(tmp_path / "nan.npy", np.full((1, 8), np.nan, np.float32))
    before = {p: p.read_bytes() for p in (tmp / "index").rglob("*") if p.is_file()}
    for argv, msg in [
        (["index", "remove", idx, "--ids", str(tmp_path / "float.txt")], "'2.7'"),
        (["index", "remove", idx, "--ids", str(tmp_path / "bool.json")], "boolean"),
        (["index", "remove", idx, "--ids", str(tmp_path / "obj.json")], "remove"),
        (["index", "remove", idx, "--ids", str(tmp_path / "float.npy")], "integer dtype"),
        (["dedup", idx, "--threshold", "-5"], "(0, 1]"),
        (["dedup", idx, "--threshold", "nan"], "(0, 1]"),
        (["dedup", idx, "--fraction", "1.5"], "(0, 1)"),
        (["dedup", idx, "--neighbors", "0"], "1..1000"),
        (["dedup", idx, "--neighbors", "100000000"], "1..1000"),
        (["search", idx, str(tmp_path / "nan.npy")], "NaN"),
        (["search", idx, "id:1", "--k", "0"], "--k"),
        (["search", idx, "id:1", "--threshold", "7"], "threshold"),
        (["search", idx, "id:1", "--html", str(tmp_path)], "--html"),
    ]:
        assert msg in one_line_error(capsys, argv), argv
    after = {p: p.read_bytes() for p in (tmp / "index").rglob("*") if p.is_file()}
    assert after == before  # nothing was changed by the refused commands
    capsys.readouterr()
    assert main(["search", idx, "id:1", "--k", "100000000", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 40


def test_refresh_switches_to_a_new_version(hostile_index, tmp_path):
    tmp, x = hostile_index
    index = uniret.open_index(tmp / "index")
    old = index.version
    assert index.refresh() is False
    extra = [Item(path=f"new{i}.png", domain="new", split="test", position=i) for i in range(3)]
    write_store(tmp_path / "more", unit(np.ones((3, 8))), extra, model={"config_hash": "h"})
    running = index.searcher  # what a search in flight holds
    add_to_index(tmp / "index", tmp_path / "more")
    assert index.count == 40 and index.refresh() is True and index.version != old
    assert index.count == 43 and "new" in index.domains()
    assert running.search(x[:1], 3)[1].shape == (1, 3)  # the old version still answers
