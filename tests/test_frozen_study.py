"""benchmarks/frozen_study.py at toy size on the demo collection, in its three regimes: heads on the
frozen backbone (cached features), the last stage trained on cached outputs of the rest, and the whole
network fine-tuned. Each writes its rows, the UDON row's teacher-vs-student check, and a recipe that
is the regime's (cache or not, the backbone's frozen share)."""

import json

import numpy as np
import pytest


@pytest.mark.parametrize("regime", [["--blocks", "0"], ["--blocks", "1"], ["--full"]], ids=["frozen", "last-stage", "full"])
def test_frozen_study_regimes(benchmark_script, demo_lmdb, tmp_path, regime):
    study = benchmark_script("frozen_study")
    out = tmp_path / "study"
    args = ["--data", str(demo_lmdb), "--out", str(out), "--backbone", "timm:test_efficientnet", "--image-size", "32",
            "--steps", "2", "--batch-size", "8", "--val-every", "2", "--seeds", "0",
            "--rows", "none,uscrr,udon-joint-dynamic", *regime]
    study.main(args)
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"none", "uscrr", "udon-joint-dynamic"}
    for row in results.values():
        mean = row["0"]["mean"]
        assert set(mean) == {"mAP@100", "mMP@5", "R@1"} and all(0.0 <= v <= 1.0 for v in mean.values())
    check = results["udon-joint-dynamic"]["0"]["teacher_vs_student"]
    assert {"teacher_mAP@100", "student_mAP@100"} <= set(next(iter(check.values())))
    recipe = json.loads((out / "recipe.json").read_text())
    if regime == ["--full"]:
        assert "feature_cache" not in recipe and recipe["backbone_freeze_fraction"] == 0.2
        assert (out / "prefix-test-full-32px.npy").is_file()  # the preprocessed test images, once
    else:
        assert recipe["feature_cache"] and recipe["backbone_freeze_fraction"] == 0.0
        assert recipe.get("freeze_backbone") is (True if regime == ["--blocks", "0"] else None)
        assert recipe.get("train_blocks") == (1 if regime == ["--blocks", "1"] else None)

    # re-running continues: finished runs are kept, the same numbers come back
    before = (out / "runs" / "uscrr-s0" / "summary.json").stat().st_mtime_ns
    study.main(args)
    again = json.loads((out / "results.json").read_text())["results"]
    assert (out / "runs" / "uscrr-s0" / "summary.json").stat().st_mtime_ns == before
    assert np.isclose(again["uscrr"]["0"]["mean"]["mAP@100"], results["uscrr"]["0"]["mean"]["mAP@100"])


def test_frozen_study_refuses_full_with_blocks(benchmark_script, tmp_path):
    study = benchmark_script("frozen_study")
    with pytest.raises(SystemExit):
        study.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--full", "--blocks", "1"])
