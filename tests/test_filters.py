"""`--where` filters on any metadata field: the parser (no eval), results equal to brute force
filter-then-search on exact and Faiss-selector paths, k results when k pass, one-line errors in the
CLI and 400s from the server."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from servers import LiveServer

import uniret
from uniret.cli import main
from uniret.data.collection import Item
from uniret.embed.store import write_store
from uniret.errors import UsageError
from uniret.index import filters
from uniret.index.build import build_index
from uniret.index.filters import Condition, parse_condition

N, DIM, K = 400, 16, 10
LABELS = ("cat", "dog", "bird", "fish")


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store of random vectors whose items carry a label, a price (missing on some) and a domain."""
    tmp = tmp_path_factory.mktemp("filters")
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(N, DIM))).astype(np.float16).astype(np.float32)
    items, fields = [], []
    for i in range(N):
        extra = {"label": LABELS[i % 4]}
        if i % 10:
            extra["price"] = int(rng.integers(0, 100))
        if i == 7:
            extra["rare"] = "yes"
        fields.append({"id": i, "domain": "a" if i < 300 else "b", "class_ids": [i % 4], **extra})
        items.append(Item(f"{i}.jpg", "a" if i < 300 else "b", "test", i, (i % 4,), extra))
    write_store(tmp / "store", vectors, items, model={"config_hash": "x"})
    build_index(tmp / "store", tmp / "flat", kind="flat")
    build_index(tmp / "store", tmp / "ivf", kind="IVF4,Flat")
    queries = unit(rng.normal(size=(5, DIM)))
    return tmp, vectors, fields, queries


def brute_force(vectors, fields, queries, keep, k):
    rows = np.array([i for i, f in enumerate(fields) if keep(f)], dtype=np.int64)
    if len(rows) == 0:
        return [[] for _ in queries]
    scores = queries @ vectors[rows].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [rows[o].tolist() for o in order]


CASES = [  # expressions, the same as Python, and how many items pass
    (["label == 'cat'"], lambda f: f["label"] == "cat"),
    (["label == 'cat'", "price < 20"], lambda f: f["label"] == "cat" and f.get("price", 1e9) < 20),
    (["price >= 50", "domain != 'a'"], lambda f: f.get("price", -1) >= 50 and f["domain"] != "a"),
    (["label in ['dog', 'fish']"], lambda f: f["label"] in ("dog", "fish")),
    (["label not in ['dog', 'fish']", "price <= 3"], lambda f: f["label"] not in ("dog", "fish")
     and f.get("price", 1e9) <= 3),
    (["class_id == 2", "id > 350"], lambda f: 2 in f["class_ids"] and f["id"] > 350),
    (["rare == 'yes'"], lambda f: f.get("rare") == "yes"),  # one item: fewer than k
    (["price > 1000"], lambda f: False),  # none
]


@pytest.mark.parametrize("exact_max", [filters.FILTER_EXACT_MAX, 0])
@pytest.mark.parametrize("where, keep", CASES)
def test_results_equal_brute_force(world, where, keep, exact_max, monkeypatch):
    import uniret.index.searcher as searcher_module

    monkeypatch.setattr(searcher_module, "FILTER_EXACT_MAX", exact_max)  # 0: the Faiss IDSelector path
    tmp, vectors, fields, queries = world
    index = uniret.open_index(tmp / "flat", gpu="off")
    results = index.search([q for q in queries], k=K, where=where)
    want = brute_force(vectors, fields, queries, keep, K)
    passing = sum(keep(f) for f in fields)
    for res, expected in zip(results, want):
        assert [r["id"] for r in res.rows] == expected
        assert len(res.rows) == min(K, passing)  # k results whenever k items pass
        assert all(keep(next(f for f in fields if f["id"] == r["id"])) for r in res.rows)


def test_ivf_with_a_selector_still_returns_k(world, monkeypatch):
    import uniret.index.searcher as searcher_module

    monkeypatch.setattr(searcher_module, "FILTER_EXACT_MAX", 0)
    tmp, vectors, fields, queries = world
    index = uniret.open_index(tmp / "ivf", gpu="off")
    index.searcher.index.nprobe = 1  # one list of four: the selected items are mostly elsewhere
    res = index.search([q for q in queries], k=K, where=["label == 'cat'", "price < 20"])
    passing = sum(f["label"] == "cat" and f.get("price", 1e9) < 20 for f in fields)
    assert passing >= K
    for r in res:
        assert len(r.rows) == K and all(row["label"] == "cat" and row["price"] < 20 for row in r.rows)
        scores = [row["score"] for row in r.rows]
        assert scores == sorted(scores, reverse=True)


def test_parser_accepts_the_small_grammar_only():
    assert parse_condition("label == 'cat'") == Condition("label", "==", "cat", "label == 'cat'")
    assert parse_condition(" price<-2.5 ").value == -2.5
    assert parse_condition('ok == true').value is True
    assert parse_condition("x in ('a', 1)").value == ["a", 1]
    for bad in ["", "label", "label = 'cat'", "__import__('os').system('true') == 1", "label == open('x')",
                "a == b.c", "1 < a < 2", "label == 'a' or 1", "a in 3", "label ~= 'x'", "a is None",
                "a == [x for x in y]"]:
        with pytest.raises(UsageError) as info:
            parse_condition(bad)
        assert "\n" not in str(info.value) and str(info.value).startswith("--where")


def test_cli_where_and_its_errors(world, capsys):
    tmp, vectors, fields, queries = world
    np.save(tmp / "q.npy", queries[:1])
    capsys.readouterr()
    assert main(["search", str(tmp / "flat"), str(tmp / "q.npy"), "--k", "3", "--where", "label == 'dog'",
                 "--where", "price < 30", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 3 and all(r["label"] == "dog" and r["price"] < 30 for r in rows)
    for where, message in [("colour == 'red'", "no item has a field 'colour'; fields: class_id, "),
                           ("label === 'x'", "cannot parse it")]:
        assert main(["search", str(tmp / "flat"), "id:0", "--where", where]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_server_where_and_400(world):
    tmp, vectors, fields, queries = world
    from uniret.serve import ServeSettings, create_app

    index = uniret.open_index(tmp / "flat", gpu="off")
    with LiveServer(create_app(index, ServeSettings())) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = {"vectors": queries[:2].tolist(), "k": 4, "where": ["label == 'fish'", "price > 40"]}
        res = client.post("/search", json=body).json()
        want = brute_force(vectors, fields, queries[:2], lambda f: f["label"] == "fish" and f.get("price", 0) > 40, 4)
        assert [[r["id"] for r in q["results"]] for q in res["results"]] == want
        assert res["where"] == body["where"]
        one = client.post("/search", params={"where": "label == 'bird'"}, json={"ids": [0], "k": 2}).json()
        assert all(r["label"] == "bird" for r in one["results"][0]["results"])
        for where in ["nope == 1", "label == cat()", 5]:
            bad = client.post("/search", json={"ids": [0], "where": where})
            assert bad.status_code == 400 and "\n" not in bad.json()["error"], bad.text
