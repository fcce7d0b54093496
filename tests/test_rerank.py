"""Rerankers: hand-made examples with a known reordering, and naive per-query references."""

import numpy as np
import pytest
import torch

from uniret.errors import UniretError
from uniret.index.rerank import (
    RERANKERS,
    alpha_qe,
    aqe,
    candidate_depth,
    get_reranker,
    rerank,
    reranker_names,
    superglobal,
)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def ranked(q, D):
    """Candidates 0..m-1 sorted by q . d (the input of a reranker)."""
    s = D @ q
    order = np.argsort(-s, kind="stable")
    return order[None].astype(np.int64), s[order][None].astype(np.float32)


def naive_superglobal(q, D, K, beta):
    """METHOD.md §4 written as plainly as possible, one query, Python loops."""
    S = D @ D.T
    refined = []
    for i in range(len(D)):
        neighbours = [j for j in np.argsort(-S[i], kind="stable") if j != i][:K]
        refined.append(unit(D[i] + sum(beta * S[i, j] * D[j] for j in neighbours)))
    refined = np.array(refined)
    s1 = refined @ q
    top = np.argsort(-s1, kind="stable")[: K + 1]
    q_exp = unit(refined[top].max(axis=0))
    return (s1 + refined @ q_exp) / 2


Q = unit([1, 0, 0, 0])
# Three near-duplicates r0, r1, r3 of one identity, and x (id 2) that is close to the query but unlike
# the other top results. x starts above r3; SuperGlobal's neighbour refinement and max-pooled query
# expansion pull r3 (which agrees with the top results) above x.
HAND = np.array([unit([0.60, 0.80, 0, 0.02]), unit([0.58, 0.815, 0, 0]), unit([0.55, -0.3, 0.78, 0]),
                 unit([0.52, 0.854, 0, -0.02]), unit([0.10, 0, 0, 0.995])])


@pytest.mark.parametrize("K", [1, 2, 9])
def test_superglobal_hand_made_reordering(K):
    ids, scores = ranked(Q, HAND)
    assert ids[0].tolist() == [0, 1, 2, 3, 4]
    new_scores, new_ids = superglobal(Q[None].astype(np.float32), HAND.astype(np.float32), ids, scores, K=K)
    assert new_ids[0].tolist() == [0, 1, 3, 2, 4]
    expected = naive_superglobal(Q, HAND, K, 0.15)
    np.testing.assert_allclose(new_scores[0], expected[new_ids[0]], atol=1e-5)


def test_superglobal_matches_naive_reference_batched():
    rng = np.random.default_rng(0)
    nb, d, nq, c = 60, 8, 7, 25
    xb = rng.normal(size=(nb, d))
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.normal(size=(nq, d))
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    sims = xq @ xb.T
    ids = np.argsort(-sims, axis=1)[:, :c]
    scores = np.take_along_axis(sims, ids, 1).astype(np.float32)
    M, K, beta = 12, 3, 0.3
    out_s, out_i = superglobal(xq.astype(np.float32), xb.astype(np.float32), ids, scores, M=M, K=K, beta=beta,
                               batch_size=3)
    for qi in range(nq):
        ref = naive_superglobal(xq[qi], xb[ids[qi, :M]], K, beta)
        order = np.argsort(-ref, kind="stable")
        assert out_i[qi, :M].tolist() == ids[qi, :M][order].tolist()
        np.testing.assert_allclose(out_s[qi, :M], ref[order], atol=1e-5)
    # the tail behind M keeps its order and scores
    np.testing.assert_array_equal(out_i[:, M:], ids[:, M:])
    np.testing.assert_array_equal(out_s[:, M:], scores[:, M:])
    # a callable that gathers rows gives the same result, torch tensors in give tensors out
    s2, i2 = superglobal(xq.astype(np.float32), lambda r: xb[r].astype(np.float16), ids, scores, M=M, K=K, beta=beta)
    np.testing.assert_array_equal(i2, out_i)
    s3, i3 = superglobal(torch.tensor(xq, dtype=torch.float32), torch.tensor(xb, dtype=torch.float32),
                         torch.tensor(ids), torch.tensor(scores), M=M, K=K, beta=beta)
    assert isinstance(i3, torch.Tensor) and i3.numpy().tolist() == out_i.tolist()


def test_superglobal_handles_padding():
    ids, scores = ranked(Q, HAND)
    ids = np.concatenate([ids, [[-1, -1]]], axis=1)
    scores = np.concatenate([scores, [[-np.inf, -np.inf]]], axis=1).astype(np.float32)
    s, i = superglobal(Q[None].astype(np.float32), HAND.astype(np.float32), ids, scores)
    assert i[0].tolist() == [0, 1, 3, 2, 4, -1, -1]
    assert np.isneginf(s[0, -2:]).all() and np.isfinite(s[0, :5]).all()


# AQE example: a (id 0) is the true top match; b (id 2) is another view of the same thing (close to a);
# x (id 1) is a distractor that starts above b. Expanding the query with a lifts b above x.
AQE_HAND = np.array([unit([0.9, 0.436, 0]), unit([0.7, 0, 0.714]), unit([0.6, 0.8, 0])])
Q3 = unit([1, 0, 0])


def test_aqe_hand_made_reordering():
    ids, scores = ranked(Q3, AQE_HAND)
    assert ids[0].tolist() == [0, 1, 2]
    s, i = aqe(Q3[None].astype(np.float32), AQE_HAND.astype(np.float32), ids, scores, k=1)
    assert i[0].tolist() == [0, 2, 1]
    q_new = unit(Q3 + AQE_HAND[0])  # hand computation: q' = normalize(q + a)
    np.testing.assert_allclose(s[0], (AQE_HAND @ q_new)[[0, 2, 1]], atol=1e-6)
    np.testing.assert_allclose(s[0], [0.9751, 0.7642, 0.6824], atol=1e-3)


def test_alpha_qe_hand_made_and_weights():
    ids, scores = ranked(Q3, AQE_HAND)
    s, i = alpha_qe(Q3[None].astype(np.float32), AQE_HAND.astype(np.float32), ids, scores, k=1, alpha=3)
    assert i[0].tolist() == [0, 2, 1]
    # q' = normalize(q + 0.9^3 a): b = 0.740, x = 0.688 by hand
    np.testing.assert_allclose(s[0, 1:], [0.7403, 0.6875], atol=1e-3)
    # with k=2 the distractor enters the expansion: alpha-QE down-weights it (0.7^3 vs 1), AQE does not
    s_a, _ = alpha_qe(Q3[None].astype(np.float32), AQE_HAND.astype(np.float32), ids, scores, k=2, alpha=3)
    w = (AQE_HAND[:2] @ Q3) ** 3  # ~ (0.9^3, 0.7^3)
    q_alpha = unit(Q3 + w[0] * AQE_HAND[0] + w[1] * AQE_HAND[1])
    np.testing.assert_allclose(np.sort(s_a[0])[::-1], np.sort(AQE_HAND @ q_alpha)[::-1], atol=1e-5)


def test_rerank_dispatch():
    ids, scores = ranked(Q3, AQE_HAND)
    s, i = rerank("none", Q3[None], AQE_HAND, ids, scores)
    assert i is ids
    _, i = rerank("alpha-qe", Q3[None].astype(np.float32), AQE_HAND.astype(np.float32), ids, scores, k=1)
    assert i[0].tolist() == [0, 2, 1]
    with pytest.raises(UniretError, match="unknown reranker 'bogus'; use one of none, superglobal"):
        rerank("bogus", Q3[None], AQE_HAND, ids, scores)


def test_registry_names_functions_and_depths():
    assert reranker_names() == ["none", *RERANKERS]
    assert {name: (r.fn, r.depth) for name, r in RERANKERS.items()} == {
        "superglobal": (superglobal, 400), "aqe": (aqe, 100), "alpha-qe": (alpha_qe, 100)}
    assert get_reranker("none") is None and get_reranker(None) is None
    assert candidate_depth(None, 10) == 10 and candidate_depth("none", 10) == 10
    assert candidate_depth("superglobal", 10) == 400 and candidate_depth("aqe", 500) == 500
    assert candidate_depth("aqe", 10, depth=30) == 30
    with pytest.raises(UniretError, match="unknown reranker"):
        candidate_depth("alpha_qe", 10)


def test_cli_choices_come_from_the_registry():
    import typer

    from uniret.cli import app

    command = typer.main.get_command(app)
    for sub in (command.commands["search"], command.commands["eval"]):
        option = next(p for p in sub.params if "--rerank" in p.opts)
        assert [m.value for m in option.type_descriptor.annotation] == reranker_names(), sub.name
