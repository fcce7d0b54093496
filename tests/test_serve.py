"""`uniret serve`: the real app over loopback (uvicorn in a thread, httpx): every endpoint, every bad
input as a one-line 4xx, the token, micro-batching equal to single requests, a live index update
under load with no failed request, and an index that is never written."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import LiveServer
from test_search_api import bomb_png, unit

import uniret
from uniret.cli import main
from uniret.data.collection import Item
from uniret.data.store import LmdbCollection
from uniret.embed.store import EmbeddingStore, write_store
from uniret.index.build import add_to_index, build_index, remove_from_index
from uniret.serve import ServeSettings, create_app


def snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def server(image_index, demo_root):
    index = uniret.open_index(image_index / "index", images=demo_root)
    before = snapshot(image_index / "index")
    with LiveServer(create_app(index, ServeSettings(max_upload_mb=1, max_wait_ms=20))) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, index
    assert snapshot(image_index / "index") == before  # the server never writes to the index


def png_bytes(path) -> bytes:
    return path.read_bytes()


def test_endpoints(server, image_index, demo_root):
    client, index = server
    store = EmbeddingStore(image_index / "store")
    assert client.get("/healthz").json() == {"status": "ok", "version": index.version}
    info = client.get("/info").json()
    assert info["count"] == store.count and info["dim"] == 16 and info["model"]["copy"] is True
    assert info["recall"]["recall"] == 1.0 and info["key"] == "Flat" and "flags" in info["domains"]
    item = client.get("/items/5").json()
    assert item["path"] == store.items[5].path and item["image_url"] == "/items/5/image"
    image = client.get("/items/5/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == (demo_root / "images" / store.items[5].path).read_bytes()
    # an image query finds itself; results carry metadata and image URLs
    upload = (demo_root / "images" / store.items[9].path)
    res = client.post("/search", params={"k": 3}, files={"file": ("q.png", upload.read_bytes())}).json()
    top = res["results"][0]
    assert top["query"] == "q.png" and len(top["results"]) == 3
    assert top["results"][0]["id"] == 9 and top["results"][0]["score"] > 0.999
    assert top["results"][0]["image_url"] == "/items/9/image" and top["results"][0]["domain"] == store.items[9].domain
    # JSON ids and vectors, with the parameters in the body
    by_id = client.post("/search", json={"ids": [9], "k": 3}).json()["results"][0]["results"]
    assert [r["id"] for r in by_id] == [r["id"] for r in top["results"]]
    vec = np.asarray(store.embeddings[9], dtype=np.float32).tolist()
    by_vec = client.post("/search", json={"vectors": [vec, vec], "k": 2, "domain": "flags", "rerank": "aqe"}).json()
    assert len(by_vec["results"]) == 2 and all(r["domain"] == "flags" for r in by_vec["results"][0]["results"])
    thresholded = client.post("/search", json={"ids": [9], "k": 50, "threshold": 0.999}).json()
    assert [r["id"] for r in thresholded["results"][0]["results"]] == [9]
    metrics = client.get("/metrics").text
    assert 'uniret_requests_total{endpoint="/search",status="200"}' in metrics
    assert "uniret_batch_queries_count" in metrics and "uniret_request_latency_seconds_bucket" in metrics
    assert f"uniret_index_items {float(store.count)}" in metrics
    assert "/search" in client.get("/openapi.json").json()["paths"] and client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_bad_inputs_are_one_line_4xx(server, demo_root):
    client, index = server
    image = next((demo_root / "images").rglob("*.png")).read_bytes()
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 200, 10)).save(buf, format="PNG")
    cases = [
        ("not an image", dict(files={"file": ("a.png", b"hello")}), 400, "not an image uniret can read"),
        ("truncated", dict(files={"file": ("t.png", buf.getvalue()[:200])}), 400, "truncated"),
        ("over the limit", dict(files={"file": ("big.png", b"\0" * (1 << 20) + image)}), 413, "upload limit"),
        ("bomb", dict(files={"file": ("bomb.png", bomb_png())}), 400, "decompression bomb"),
        ("k=0", dict(json={"ids": [1], "k": 0}), 400, "k must be"),
        ("k huge", dict(json={"ids": [1], "k": 10**9}), 400, "k must be"),
        ("k text", dict(params={"k": "ten"}, json={"ids": [1]}), 400, "k must be"),
        ("k float", dict(json={"ids": [1], "k": 2.5}), 400, "k must be"),
        ("reranker", dict(json={"ids": [1], "rerank": "magic"}), 400, "unknown reranker"),
        ("domain", dict(json={"ids": [1], "domain": "<script>"}), 400, "unknown domain"),
        ("threshold", dict(json={"ids": [1], "threshold": "NaN"}), 400, "threshold"),
        ("wrong dim", dict(json={"vectors": [[1.0, 2.0]]}), 400, "16-d"),
        ("nan vector", dict(content=b'{"vectors": [[NaN' + b", 1.0" * 15 + b"]]}",
                            headers={"content-type": "application/json"}), 400, "NaN"),
        ("ragged", dict(json={"vectors": [[1.0], [1.0, 2.0]]}), 400, "vectors"),
        ("text vector", dict(json={"vectors": [["a"] * 16]}), 400, "vectors"),
        ("unknown id", dict(json={"ids": [10**12]}), 404, "not in the index"),
        ("float id", dict(json={"ids": [2.7]}), 400, "2.7"),
        ("bool id", dict(json={"ids": [True]}), 400, "boolean"),
        ("form id", dict(data={"ids": "1,x"}, files={"file": ("a.png", image)}), 400, "'x'"),
        ("no query", dict(json={}), 400, "no query"),
        ("bad json", dict(content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        ("unknown key", dict(json={"ids": [1], "kk": 3}), 400, "JSON object"),
        ("content type", dict(content=b"x", headers={"content-type": "text/plain"}), 415, "multipart"),
        ("too many", dict(json={"ids": list(range(300))}), 400, "at most"),
    ]
    for name, kwargs, status, message in cases:
        r = client.post("/search", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert message in error and "\n" not in error and "Traceback" not in error, (name, error)
    for path, status in [("/items/2.7", 400), ("/items/true", 400), ("/items/-1", 400), ("/items/99999999", 404),
                         ("/items/99999999/image", 404), ("/nowhere", 404)]:
        r = client.get(path)
        assert r.status_code == status and "\n" not in r.json()["error"], (path, r.text)
    assert client.get("/search").status_code == 405


def test_images_from_lmdb_and_never_outside_the_root(image_index, demo_lmdb, tmp_path):
    index = uniret.open_index(image_index / "index", images=demo_lmdb)
    with LiveServer(create_app(index)) as url:
        item = httpx.get(f"{url}/items/5").json()
        got = httpx.get(f"{url}/items/5/image")
        assert got.status_code == 200
        expected = LmdbCollection(demo_lmdb).get_image_bytes(item["domain"], item["split"], item["position"])
        assert got.content == expected
    # stored paths that try to leave the image root are never served
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.png").write_bytes(b"\x89PNG TOPSECRET-CONTENT")
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "secret.png")
    paths = ["../secret.png", str(tmp_path / "secret.png"), "link.png", "a/../../secret.png"]
    items = [Item(path=p, domain="d", split="test", position=i) for i, p in enumerate(paths)]
    write_store(tmp_path / "store", unit(np.eye(4, 8, dtype=np.float32) + 0.1), items, model={"config_hash": "h"})
    build_index(tmp_path / "store", tmp_path / "index")
    hostile = uniret.open_index(tmp_path / "index", images=tmp_path / "root")
    with LiveServer(create_app(hostile)) as url:
        for i in range(len(paths)):
            r = httpx.get(f"{url}/items/{i}/image")
            assert r.status_code == 404 and b"TOPSECRET" not in r.content, (paths[i], r.text)


def test_token(image_index):
    index = uniret.open_index(image_index / "index")
    with LiveServer(create_app(index, ServeSettings(token="s3cret"))) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        for path in ("/info", "/items/1", "/metrics", "/", "/docs"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and "token" in r.json()["error"], path
        assert httpx.get(f"{url}/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = httpx.post(f"{url}/search", json={"ids": [1]}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        with httpx.Client(base_url=url) as browser:  # a browser: /?token= sets a cookie, then the page works
            r = browser.get("/?token=s3cret", follow_redirects=True)
            assert r.status_code == 200 and "uniret search" in r.text
            assert browser.get("/info").status_code == 200


def test_micro_batching_equals_single_requests(server, image_index, demo_root):
    client, _ = server
    store = EmbeddingStore(image_index / "store")
    requests = []
    for i in range(0, 24, 2):
        data = (demo_root / "images" / store.items[i].path).read_bytes()
        requests.append(dict(files={"file": (f"{i}.png", data)}, params={"k": 3 + i % 4}))
        requests.append(dict(json={"ids": [i + 1], "k": 5, "domain": store.items[i].domain}))
    single = [client.post("/search", **kw).json()["results"] for kw in requests]
    before = client.get("/metrics").text
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda kw: client.post("/search", **kw).json()["results"], requests))
    for one, many in zip(single, together):
        assert [r["id"] for r in one[0]["results"]] == [r["id"] for r in many[0]["results"]]
        np.testing.assert_allclose([r["score"] for r in one[0]["results"]],
                                   [r["score"] for r in many[0]["results"]], atol=1e-4)

    def batches(text):
        count = float(next(line.split()[1] for line in text.splitlines() if line.startswith("uniret_batch_queries_count")))
        total = float(next(line.split()[1] for line in text.splitlines() if line.startswith("uniret_batch_queries_sum")))
        return count, total

    (c0, s0), (c1, s1) = batches(before), batches(client.get("/metrics").text)
    assert s1 - s0 == len(requests) and c1 - c0 < len(requests)  # some requests shared a batch


def test_live_update_under_load(tmp_path):
    rng = np.random.default_rng(0)
    items = [Item(path=f"{i}.png", domain="a", split="test", position=i) for i in range(300)]
    write_store(tmp_path / "store", unit(rng.normal(size=(300, 8))), items, model={"config_hash": "h"})
    build_index(tmp_path / "store", tmp_path / "index")
    more = [Item(path=f"new{i}.png", domain="b", split="test", position=i) for i in range(50)]
    write_store(tmp_path / "more", unit(rng.normal(size=(50, 8))), more, model={"config_hash": "h"})
    index = uniret.open_index(tmp_path / "index")
    failures, done, stop = [], [0], threading.Event()
    settings = ServeSettings(refresh_seconds=0.05, max_wait_ms=2)
    with LiveServer(create_app(index, settings)) as url:
        def hammer(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                i = 0
                while not stop.is_set() or i < 20:
                    r = client.post("/search", json={"ids": [(worker * 37 + i) % 100], "k": 5})
                    if r.status_code != 200:
                        failures.append(r.text)
                    done[0] += 1
                    i += 1

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        add_to_index(tmp_path / "index", tmp_path / "more")
        remove_from_index(tmp_path / "index", np.arange(200, 300))
        add_to_index(tmp_path / "index", tmp_path / "more")  # nothing new: no version
        deadline = threading.Event()
        for _ in range(200):
            if httpx.get(f"{url}/info").json()["count"] == 250:
                break
            deadline.wait(0.05)
        stop.set()
        for t in threads:
            t.join()
        assert httpx.get(f"{url}/info").json()["count"] == 250
        hits = httpx.post(f"{url}/search", json={"ids": [300], "k": 1}).json()["results"][0]["results"]
        assert hits[0]["path"] == "new0.png"
    assert not failures and done[0] >= 80, (failures[:3], done)


def test_serve_command_checks_and_warns(image_index, monkeypatch, capsys, caplog):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    idx = str(image_index / "index")
    for argv, message in [(["serve", idx, "--port", "0"], "--port"), (["serve", idx, "--max-batch", "0"], "--max-batch"),
                          (["serve", idx, "--max-upload-mb", "-1"], "--max-upload-mb"),
                          (["serve", idx, "--max-wait-ms", "1e9"], "--max-wait-ms"),
                          (["serve", idx, "--device", "bogus"], "--device"),
                          (["serve", str(image_index / "nope")], "not an index directory"),
                          (["serve", idx, "--images", str(image_index / "nope")], "--images")]:
        capsys.readouterr()
        assert main(argv) in (1, 2), argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], (argv, err)
    assert not calls
    monkeypatch.delenv("UNIRET_TOKEN", raising=False)
    capsys.readouterr()
    # off loopback a token is required (issue #21): one line, nothing served
    assert main(["serve", idx, "--host", "0.0.0.0", "--port", "8123"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without --token" in err[0] and not calls
    monkeypatch.setenv("UNIRET_TOKEN", "t0ken")
    assert main(["serve", idx, "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert [{k: kw[k] for k in ("host", "port", "log_level", "access_log")} for kw in calls] == [
        {"host": "0.0.0.0", "port": 8123, "log_level": "warning", "access_log": False}]
    assert calls[0]["timeout_keep_alive"] > 0 and calls[0]["limit_concurrency"] > 1  # issue #21
    out = capsys.readouterr().err
    assert "http://0.0.0.0:8123/" in out and "?token=<token>" in out
