"""exact_search: faiss CPU vs brute force, the torch chunked path, padding, the k > 2048 fallback."""

import numpy as np
import pytest
import torch

from uniret.index.exact import exact_search, torch_search


def data(nq=37, nb=500, d=16, seed=0):
    rng = np.random.default_rng(seed)
    xq = rng.normal(size=(nq, d)).astype(np.float32)
    xb = rng.normal(size=(nb, d)).astype(np.float32)
    return xq / np.linalg.norm(xq, axis=1, keepdims=True), xb / np.linalg.norm(xb, axis=1, keepdims=True)


def brute(xq, xb, k):
    sims = xq.astype(np.float64) @ xb.T.astype(np.float64)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


def test_exact_search_cpu_equals_brute_force():
    xq, xb = data()
    s, i = exact_search(xq, xb, 10, device="cpu")
    ref_s, ref_i = brute(xq, xb, 10)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == (37, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)


def test_torch_path_equals_faiss_cpu():
    # the CUDA code path, run on the CPU: small blocks, and the fp16-shortlist + fp32-rescoring branch
    xq, xb = data(nq=50)
    ref_s, ref_i = exact_search(xq, xb, 20, device="cpu")
    s, i = torch_search(xq, xb, 20, device="cpu", block=7)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    s, i = torch_search(xq, xb, 20, device="cpu", block=16, matmul_dtype=torch.bfloat16)
    np.testing.assert_array_equal(i, ref_i)  # shortlist 2k+16 absorbs bf16 rounding
    np.testing.assert_allclose(s, ref_s, atol=1e-5)


def test_padding_when_fewer_than_k():
    xq, xb = data(nq=3, nb=4)
    for fn in (lambda: exact_search(xq, xb, 6, device="cpu"), lambda: torch_search(xq, xb, 6, device="cpu")):
        s, i = fn()
        assert i.shape == (3, 6)
        assert (i[:, 4:] == -1).all() and np.isneginf(s[:, 4:]).all()
        assert sorted(i[0, :4].tolist()) == [0, 1, 2, 3]


def test_large_k_and_torch_inputs():
    xq, xb = data(nq=2, nb=3000, d=8)
    s, i = exact_search(torch.from_numpy(xq), xb, 2100)  # auto device; k > 2048 is CPU anyway
    ref_s, ref_i = brute(xq, xb, 2100)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    assert (i[:, :50] == ref_i[:, :50]).all()
    with pytest.raises(ValueError):
        exact_search(xq, xb[:, :4], 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cuda_paths_equal_cpu_exact():
    xq, xb = data(nq=300, nb=20000, d=64)
    ref_s, ref_i = exact_search(xq, xb, 100, device="cpu")
    for s, i in (torch_search(xq, xb, 100, device="cuda"), exact_search(xq, xb, 100, device="cuda")):
        assert (i == ref_i).mean() > 0.999  # fp32 ties aside, the same ids in the same order
        np.testing.assert_allclose(s, ref_s, atol=1e-4)
