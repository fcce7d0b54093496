"""benchmarks/gpu_suite.sh end to end on the CPU at toy size (--tiny): every step runs through the
same scripts as on a GPU and lands in one summary.json + summary.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def test_gpu_suite_tiny_on_cpu(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(SUITE), str(out), "--tiny"], capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "--tiny" and summary["embed"][0]["device"].startswith("cpu")
    assert summary["train"]["udon/uscrr"] > 0 and summary["search"]["ids_equal_to_naive"] > 0.9
    assert set(summary["methods"]) == {"uscrr", "udon-round_robin", "udon-dynamic"}
    assert set(summary["finetune"]) == {"uscrr", "udon-rr-joint"}  # --tiny: two of the six rows
    md = (out / "summary.md").read_text()
    assert "exact search 2000 x 64" in md and "udon-dynamic" in md and "pretrained full fine-tuning" in md
    bad = subprocess.run(["bash", str(SUITE), str(tmp_path / "x"), "--huge"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "usage" in bad.stderr
