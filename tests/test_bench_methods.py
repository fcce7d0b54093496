"""benchmarks/bench_methods.py end to end on the demo collection at toy size: every row trains and
is evaluated through the CLI, the summary averages the seeds' reports, and a re-run reuses them."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_methods_toy_run(benchmark_script, demo_lmdb, tmp_path, capsys):
    bench = benchmark_script("bench_methods")
    out = tmp_path / "bench"
    args = ["--data", str(demo_lmdb), "--out", str(out), "--seeds", "0", "--backbone", "timm:test_resnet",
            "--image-size", "32", "--steps", "2", "--batch-size", "8", "--val-every", "2", "--device", "cpu"]
    bench.main(args)
    results = json.loads((out / "results.json").read_text())
    merged = results["results"]["merged"]
    assert set(merged) == set(bench.ROWS) - {"stage1"}  # stage1 only in the two-stage regime
    assert set(results["results"]["separate"]) == {"specialist-oracle"}
    report = json.loads((out / "reports" / "udon-dynamic-s0" / "metrics.json").read_text())
    assert merged["udon-dynamic"]["mean/mAP@100"] == [report["results"]["merged"]["mean"]["mAP@100"]]
    assert "| udon-dynamic |" in (out / "results.md").read_text()
    timings = json.loads((out / "timings.json").read_text())
    assert "train udon-dynamic-s0" in timings and "eval specialist-oracle-s0" in timings
    before = (out / "timings.json").read_text()
    bench.main(args)  # everything is there: nothing is trained or evaluated again
    assert (out / "timings.json").read_text() == before


def test_bench_methods_two_stage_capacity_and_ablations(benchmark_script, demo_lmdb, tmp_path):
    """Stage 1 once per seed, every row from its backbone; a 16-d student; the ablation rows get their
    own config fields on top of --config."""
    bench = benchmark_script("bench_methods")
    out = tmp_path / "two"
    cfg = tmp_path / "stage2.json"
    cfg.write_text(json.dumps({"teacher_dim": 64, "backbone_freeze_fraction": 0.5}))
    bench.main(["--data", str(demo_lmdb), "--out", str(out), "--seeds", "0", "--backbone", "timm:test_resnet",
                "--image-size", "32", "--steps", "2", "--batch-size", "8", "--val-every", "2", "--device", "cpu",
                "--dim", "16", "--config", str(cfg), "--stage1-steps", "2",
                "--rows", "untrained,stage1,udon-round_robin,udon-rr-nodistill,udon-rr-rel-half"])
    merged = json.loads((out / "results.json").read_text())["results"]["merged"]
    assert set(merged) == {"untrained", "stage1", "udon-round_robin", "udon-rr-nodistill", "udon-rr-rel-half"}
    stage1 = out / "runs" / "stage1-s0" / "model"
    for run in ("udon-round_robin-s0", "udon-rr-nodistill-s0", "udon-rr-rel-half-s0"):
        config = json.loads((out / "runs" / run / "train_config.json").read_text())["config"]
        assert config["backbone"] == str(stage1) and config["dim"] == 16 and config["teacher_dim"] == 64
    nodistill = json.loads((out / "runs" / "udon-rr-nodistill-s0" / "train_config.json").read_text())["config"]
    assert nodistill["distill_to_backbone"] is False
    half = json.loads((out / "runs" / "udon-rr-rel-half-s0" / "train_config.json").read_text())["config"]
    assert half["relational_factor"] == 0.125


def test_spread_and_summary_format(benchmark_script, tmp_path):
    bench = benchmark_script("bench_methods")
    assert bench.spread([0.5, 0.7]) == "0.600 ± 0.141"  # sample standard deviation
    assert bench.spread([0.5]) == "0.500"
    report = {"results": {"merged": {"mean": {"mAP@100": 0.4, "mMP@5": 0.5, "R@1": 0.6},
                                     "per_domain": {"a": {"mAP@100": 0.3, "mMP@5": 0.4, "R@1": 0.5}}}}}
    for seed, shift in ((0, 0.0), (1, 0.1)):
        d = tmp_path / "reports" / f"uscrr-s{seed}"
        d.mkdir(parents=True)
        r = json.loads(json.dumps(report))
        r["results"]["merged"]["mean"]["mAP@100"] += shift
        (d / "metrics.json").write_text(json.dumps(r))
    d = tmp_path / "reports" / "udon-rr-nodistill-s0"  # an ablation run on one seed only
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(report))
    (tmp_path / "timings.json").write_text(json.dumps({"train uscrr-s0": 10.0, "train uscrr-s1": 14.0,
                                                       "train udon-rr-nodistill-s0": 20.0,
                                                       "train uscrr-s7": 99.0}))  # not a seed asked for
    table, payload = bench.summarize(tmp_path, [0, 1], ["a"])
    assert "| uscrr | 2 | 0.450 ± 0.071 | 0.500 ± 0.000 | 0.600 ± 0.000 | 0.300 ± 0.000 | 12 |" in table
    assert "| udon-rr-nodistill | 1 | 0.400 | 0.500 | 0.600 | 0.300 | 20 |" in table  # per seed it ran
    assert payload["results"]["merged"]["uscrr"]["mean/mAP@100"] == pytest.approx([0.4, 0.5])
