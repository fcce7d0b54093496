"""benchmarks/embed_throughput.py runs and reports consistent numbers (CPU here, CUDA when visible)."""

from __future__ import annotations

import pytest


def check_rows(rows, device_type: str, tmp_path) -> None:
    assert [row["runtime"] for row in rows] == ["torch", "onnx"]
    for row in rows:
        assert row["device"].startswith(device_type) and row["images"] == 24 and row["image_size"] == 32
        assert row["compute_img_s"] > 0 and row["end_to_end_img_s"] > 0
        # the rates are rounded to 0.1 img/s and the ratio to 3 decimals: at ~3 img/s that is up to ~3% apart
        assert row["ratio"] == pytest.approx(row["end_to_end_img_s"] / row["compute_img_s"], rel=5e-2)
    onnx = rows[1]
    assert onnx["cosine_to_torch"] > 0.9999
    assert onnx["speedup_over_torch"] == pytest.approx(onnx["compute_img_s"] / rows[0]["compute_img_s"], rel=5e-2)
    assert (tmp_path / "rows.json").is_file()


def test_benchmark_cpu_branch(benchmark_script, demo_lmdb, tmp_path, capsys):
    bench = benchmark_script("embed_throughput")
    rows = bench.main(["--backbone", "timm:vit_tiny_patch16_224", "--image-size", "32", "--images", "24",
                       "--batch-size", "8", "--workers", "0", "--device", "cpu", "--data", str(demo_lmdb),
                       "--json", str(tmp_path / "rows.json")])
    check_rows(rows, "cpu", tmp_path)
    assert "ratio" in capsys.readouterr().out


@pytest.mark.gpu
def test_benchmark_cuda_branch(benchmark_script, demo_lmdb, tmp_path):
    bench = benchmark_script("embed_throughput")
    rows = bench.main(["--backbone", "timm:vit_tiny_patch16_224", "--image-size", "32", "--images", "24",
                       "--batch-size", "8", "--workers", "2", "--device", "cuda", "--data", str(demo_lmdb),
                       "--json", str(tmp_path / "rows.json")])
    check_rows(rows, "cuda", tmp_path)
