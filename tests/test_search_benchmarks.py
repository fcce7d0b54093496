"""The benchmark scripts' code paths at tiny sizes: on the CPU always, on CUDA where there is one."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_code_path_on_cpu(capsys):
    res = load("search_gpu").main(["--device", "cpu", "--nb", "3000", "--nq", "300", "--dim", "16", "--k", "20",
                                   "--clusters", "50", "--rerank-m", "40", "--repeat", "1"])
    assert res["ids_equal_to_naive"] == 1.0 and res["max_score_diff"] < 1e-5
    assert 0 <= res["superglobal_changed_top1"] <= 1 and res["search_plus_superglobal_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_gpu_benchmark_on_cuda_matches_naive():
    res = load("search_gpu").main(["--nb", "200000", "--nq", "20000", "--k", "100", "--repeat", "1"])
    assert res["ids_equal_to_naive"] > 0.999 and res["max_score_diff"] < 1e-3


def test_cpu_benchmark_small():
    res = load("index_cpu").main(["--n", "3000", "--dim", "16", "--queries", "200", "--clusters", "30",
                                  "--k", "10"])
    assert res["auto_key"] == "Flat" and res["recall@10"] == 1.0  # small: exact


def test_funnel_benchmark_small():
    res = load("search_funnel").main(["--n", "2000", "--dim", "16", "--queries", "50", "--clusters", "40",
                                      "--shortlist-dim", "4", "16", "--shortlist-k", "2000"])
    full_dim = [r for r in res["funnel"] if r["shortlist_dim"] == 16][0]
    assert full_dim["recall@10"] == 1.0  # the full dim with a shortlist of everything is exact
