"""evaluate_embeddings: merged and separate protocols, self match, rerankers from the registry."""

from __future__ import annotations

import numpy as np
import pytest

from uniret.data import Item
from uniret.errors import UniretError
from uniret.eval.metrics import retrieval_metrics
from uniret.eval.protocol import evaluate_embeddings
from uniret.index.rerank import RERANKERS


def unit(rows):
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hand_built_merged_and_separate():
    # Two domains whose classes share the id 0. The "b" query is closest to the "a" item.
    index_items = [("a", 0), ("b", 0), ("b", 1)]
    index_vectors = unit([[1, 0.1], [0.6, 0.8], [0, 1]])
    query_items = [("b", 0)]
    query_vectors = unit([[1, 0]])
    merged = evaluate_embeddings(query_vectors, query_items, index_vectors, index_items, self_match=False, k=3)
    assert merged["ids"].tolist() == [[0, 1, 2]]
    assert merged["mean"]["R@1"] == 0.0  # same class id, other domain: not relevant
    assert merged["mean"]["mAP@3"] == pytest.approx(1 / 2)
    sep = evaluate_embeddings(query_vectors, query_items, index_vectors, index_items, self_match=False, k=3,
                              protocol="separate")
    assert sep["ids"].tolist() == [[1, 2, -1]]  # only domain b, global ids, padded
    assert sep["mean"]["R@1"] == 1.0


def test_validation_self_match_drops_query():
    # merged validation: the query set is the index set; every item's nearest is itself.
    rng = np.random.default_rng(0)
    items = [Item(f"{d}{i}.png", d, "val", i, (i // 2,)) for d in ("x", "y") for i in range(6)]
    centers = unit(rng.normal(size=(6, 16)))
    vectors = unit(np.repeat(centers, 2, axis=0) + 0.05 * rng.normal(size=(12, 16)))
    r = evaluate_embeddings(vectors, items, vectors, items, self_match=True, k=4)
    assert r["ids"].shape == (12, 4)  # k + 1 retrieved, self dropped
    assert not (r["ids"] == np.arange(12)[:, None]).any()
    assert (r["ids"][:, 0] == np.arange(12) ^ 1).all()  # the other image of the class comes first
    sep = evaluate_embeddings(vectors, items, vectors, items, self_match=True, k=4, protocol="separate")
    assert (sep["ids"][:, 0] == np.arange(12) ^ 1).all()
    assert sep["mean"] == pytest.approx({"mMP@5": 1.0, "mAP@4": 1.0, "R@1": 1.0})
    assert r["per_query"]["n_q"].tolist() == [1] * 12
    assert r["mean"] == pytest.approx({"mMP@5": 1.0, "mAP@4": 1.0, "R@1": 1.0})


def test_matches_brute_force_metrics_on_random_data():
    rng = np.random.default_rng(1)
    index_items = [Item(f"i{i}", "dxy"[i % 3], "index", i, (int(rng.integers(5)),)) for i in range(50)]
    query_items = [Item(f"q{i}", "dxy"[i % 3], "test", i, (int(rng.integers(5)),)) for i in range(20)]
    xb, xq = unit(rng.normal(size=(50, 8))), unit(rng.normal(size=(20, 8)))
    r = evaluate_embeddings(xq, query_items, xb, index_items, self_match=False, k=10)
    full = np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :10]
    assert (r["ids"] == full).all()
    ref = retrieval_metrics([(q.domain, q.class_ids) for q in query_items],
                            [(x.domain, x.class_ids) for x in index_items], full, k_map=10)
    assert r["mean"] == pytest.approx(ref["mean"])
    sep = evaluate_embeddings(xq, query_items, xb, index_items, self_match=False, k=10, protocol="separate")
    dom = np.array([x.domain for x in index_items])
    for qi, q in enumerate(query_items):
        row = sep["ids"][qi][sep["ids"][qi] >= 0]
        assert (dom[row] == q.domain).all()
        sims = xq[qi] @ xb.T
        same = np.flatnonzero(dom == q.domain)
        assert row.tolist() == same[np.argsort(-sims[same], kind="stable")][:10].tolist()


def test_bad_protocol_and_reranker():
    x = unit([[1, 0]])
    with pytest.raises(UniretError, match="protocol"):
        evaluate_embeddings(x, [("a", 0)], x, [("a", 0)], self_match=False, protocol="both-ways")
    with pytest.raises(UniretError, match="reranker"):
        evaluate_embeddings(x, [("a", 0)], x, [("a", 0)], self_match=False, rerank="magic")


@pytest.mark.parametrize("name", list(RERANKERS))
def test_rerank_runs_on_candidates_without_self(name):
    rng = np.random.default_rng(3)
    items = [Item(f"p{i}", "x", "val", i, (i // 3,)) for i in range(30)]
    vectors = unit(rng.normal(size=(30, 8)))
    r = evaluate_embeddings(vectors, items, vectors, items, self_match=True, k=5, rerank=name)
    assert not (r["ids"] == np.arange(30)[:, None]).any()
    # reference: all 29 other items as candidates, reranked by the index package's function
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    cand = np.argsort(-sims, axis=1, kind="stable")[:, :29]
    _, ref_ids = RERANKERS[name].fn(vectors, vectors, cand, np.take_along_axis(sims, cand, axis=1).astype(np.float32))
    assert (r["ids"] == ref_ids[:, :5]).all()
    assert r["rerank"] == name
