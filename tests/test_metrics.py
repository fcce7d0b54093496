"""UnED metrics: every rule of METHOD.md §2 on hand-computed fixtures, plus a brute-force cross-check."""

from __future__ import annotations

import numpy as np
import pytest

from uniret.eval.metrics import count_relevant, drop_self, encode_labels, retrieval_metrics


def one(result, name):
    return result["per_query"][name]


def test_hand_computed_single_query():
    index = [("a", 0), ("a", 0), ("a", 1), ("a", 0), ("a", 2)]
    # ranks: id1 (rel), id2 (no), id0 (rel), id4 (no), id3 (rel); n_q = 3
    r = retrieval_metrics([("a", 0)], index, np.array([[1, 2, 0, 4, 3]]))
    assert one(r, "n_q").tolist() == [3]
    # MP@5 looks at the first min(n_q, 5) = 3 ranks: 2 relevant of 3.
    assert one(r, "mMP@5")[0] == pytest.approx(2 / 3)
    # AP@100 = (P@1 + P@3 + P@5) / min(3, 100) = (1 + 2/3 + 3/5) / 3
    assert one(r, "mAP@100")[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert one(r, "R@1")[0] == 1.0
    assert r["mean"] == pytest.approx({"mMP@5": 2 / 3, "mAP@100": (1 + 2 / 3 + 3 / 5) / 3, "R@1": 1.0})


def test_same_class_other_domain_is_not_relevant():
    index = [("b", 0), ("a", 0), ("b", 0)]
    r = retrieval_metrics([("a", 0)], index, np.array([[0, 2, 1]]))
    assert one(r, "n_q").tolist() == [1]
    assert one(r, "R@1")[0] == 0.0
    assert one(r, "mAP@100")[0] == pytest.approx(1 / 3)  # found at rank 3
    assert one(r, "mMP@5")[0] == 0.0  # first min(1, 5) = 1 rank holds nothing relevant
    assert r["per_query"]["relevant"].tolist() == [[False, False, True]]


def test_multi_label_shared_class_is_relevant():
    index = [("a", (2, 5)), ("a", 7), ("a", (1,)), ("a", (3, 9)), ("b", (1, 2))]
    r = retrieval_metrics([("a", (1, 2))], index, np.array([[3, 0, 4, 2, 1]]))
    # relevant: id0 (shares 2) and id2 (shares 1); id4 shares classes but is of domain b.
    assert one(r, "n_q").tolist() == [2]
    assert r["per_query"]["relevant"].tolist() == [[False, True, False, True, False]]
    assert one(r, "mMP@5")[0] == pytest.approx(1 / 2)
    assert one(r, "mAP@100")[0] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_multi_label_item_counted_once_in_n_q():
    # the index item shares two classes with the query: one relevant item, not two.
    q, x, _, _ = encode_labels([("a", (1, 2))], [("a", (1, 2)), ("a", 1), ("a", 3)])
    assert count_relevant(q, x).tolist() == [2]


def test_self_match_dropped_by_id_not_rank():
    index = [("a", 0), ("a", 0), ("a", 0), ("a", 1)]
    # query is index id 2; the ranking puts it at rank 2, not rank 1 (e.g. duplicate images).
    ranked = np.array([[0, 2, 3, 1]])
    r = retrieval_metrics([("a", 0)], index, ranked, query_ids=np.array([2]))
    assert r["per_query"]["ranked_ids"].tolist() == [[0, 3, 1, -1]]
    assert one(r, "n_q").tolist() == [2]  # ids 0 and 1, not itself
    assert one(r, "mAP@100")[0] == pytest.approx((1 + 2 / 3) / 2)
    assert one(r, "mMP@5")[0] == pytest.approx(1 / 2)
    # dropping rank 1 instead would have removed id 0, a true match, and kept the query itself
    assert one(r, "R@1")[0] == 1.0


def test_drop_self_leaves_rows_without_self_unchanged():
    out = drop_self(np.array([[5, 6, 7], [1, 2, 3], [9, 8, 7]]), np.array([6, 4, -1]))
    assert out.tolist() == [[5, 7, -1], [1, 2, 3], [9, 8, 7]]


def test_no_relevant_queries_excluded_and_counted():
    index = [("a", 0), ("a", 0), ("a", 1)]
    queries = [("a", 0), ("a", 9), ("a", 1)]  # class 9 has nothing; class 1 only itself
    ranked = np.array([[0, 1, 2], [0, 1, 2], [2, 0, 1]])
    r = retrieval_metrics(queries, index, ranked, query_ids=np.array([-1, -1, 2]))
    assert one(r, "n_q").tolist() == [2, 0, 0]
    assert one(r, "valid").tolist() == [True, False, False]
    assert r["excluded"] == 2 and r["evaluated"] == 1 and r["queries"] == 3
    assert r["per_domain"]["a"]["excluded"] == 2
    assert r["mean"]["R@1"] == 1.0 and np.isnan(one(r, "R@1")[1])


def test_normalised_by_min_nq_k():
    index = [("a", 0)] * 6 + [("a", 1)]
    ranked = np.array([[6, 0, 1, 2, 3, 4, 5]])
    r = retrieval_metrics([("a", 0)], index, ranked, k_map=3, k_mp=2)
    # n_q = 6 > k: AP@3 = (P@2 + P@3) / 3 = (1/2 + 2/3) / 3;  MP@2 = 1/2
    assert one(r, "mAP@3")[0] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert one(r, "mMP@2")[0] == pytest.approx(1 / 2)


def test_fewer_results_than_k():
    index = [("a", 0), ("a", 0), ("a", 0)]
    r = retrieval_metrics([("a", 0)], index, np.array([[1, -1, -1]]))
    assert one(r, "mAP@100")[0] == pytest.approx(1 / 3)
    assert one(r, "mMP@5")[0] == pytest.approx(1 / 3)


def test_unweighted_mean_over_domains():
    index = [("a", 0), ("b", 0), ("b", 0), ("b", 1)]
    queries = [("a", 0), ("b", 0), ("b", 0), ("b", 0)]
    ranked = np.array([[0, 1, 2, 3], [3, 1, 2, 0], [3, 1, 2, 0], [3, 1, 2, 0]])
    r = retrieval_metrics(queries, index, ranked)
    assert r["per_domain"]["a"]["R@1"] == 1.0 and r["per_domain"]["b"]["R@1"] == 0.0
    assert r["mean"]["R@1"] == pytest.approx(0.5)  # not 1/4
    assert r["per_domain"]["b"]["queries"] == 3


def brute_force(queries, index, ranked, query_ids, k_map, k_mp):
    """The definitions of METHOD.md §2, one query at a time, written independently."""
    out = {}
    for qi, (qd, qc) in enumerate(queries):
        qc = {qc} if isinstance(qc, int) else set(qc)
        me = query_ids[qi]

        def rel(i, qd=qd, qc=qc):
            d, c = index[i]
            c = {c} if isinstance(c, int) else set(c)
            return d == qd and bool(c & qc)

        row = [i for i in ranked[qi] if i >= 0 and i != me]
        n_q = sum(rel(i) for i in range(len(index)) if i != me)
        if n_q == 0:
            out.setdefault(qd, [])
            continue
        r = [rel(i) for i in row] + [False] * (k_map + k_mp)
        mp = sum(r[: min(n_q, k_mp)]) / min(n_q, k_mp)
        ap = sum(sum(r[: j + 1]) / (j + 1) for j in range(k_map) if r[j]) / min(n_q, k_map)
        out.setdefault(qd, []).append((mp, ap, float(r[0])))
    per_domain = {d: np.mean(v, axis=0) for d, v in out.items() if v}
    return per_domain, np.mean(list(per_domain.values()), axis=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brute_force_cross_check(seed):
    rng = np.random.default_rng(seed)
    domains = ["x", "y", "z"]

    def label():
        d = domains[rng.integers(3)]
        if rng.random() < 0.3:
            return d, tuple(int(c) for c in rng.choice(8, size=rng.integers(1, 3), replace=False))
        return d, int(rng.integers(8))

    index = [label() for _ in range(60)]
    # half the queries are index items (self match), half are new
    self_ids = rng.choice(60, size=20, replace=False)
    queries = [index[i] for i in self_ids] + [label() for _ in range(20)]
    query_ids = np.concatenate([self_ids, -np.ones(20, dtype=np.int64)])
    ranked = np.stack([rng.permutation(60)[:25] for _ in range(40)])
    k_map, k_mp = 10, 5
    r = retrieval_metrics(queries, index, ranked, query_ids=query_ids, k_map=k_map, k_mp=k_mp)
    per_domain, mean = brute_force(queries, index, ranked, query_ids, k_map, k_mp)
    for d, values in per_domain.items():
        got = r["per_domain"][d]
        assert [got["mMP@5"], got["mAP@10"], got["R@1"]] == pytest.approx(values.tolist())
    assert [r["mean"]["mMP@5"], r["mean"]["mAP@10"], r["mean"]["R@1"]] == pytest.approx(mean.tolist())
