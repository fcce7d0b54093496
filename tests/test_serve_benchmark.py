"""benchmarks/serve_load.py end to end at a tiny size (slow: it starts two real servers and one-shot CLIs)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_serve_load_runs_and_reports(benchmark_script, image_index, demo_root, tmp_path):
    res = benchmark_script("serve_load").main([
        "--index", str(image_index / "index"), "--images", str(demo_root), "--clients", "1", "8",
        "--requests", "24", "--queries", "6", "--cli-runs", "1", "--out", str(tmp_path / "load.json")])
    assert len(res["rows"]) == 2 * 2 * 2 * 2  # runtime torch/onnx x batching on/off x image/id x 2 client counts
    assert {r["runtime"] for r in res["rows"]} == {"torch", "onnx"} and all("loadavg" in r for r in res["rows"])
    assert all(r["errors"] == 0 and r["requests"] == 24 and r["qps"] > 0 for r in res["rows"])
    assert res["targets"]["speedup_over_cli"] > 1 and (tmp_path / "load.json").is_file()
