"""`uniret demo`: every stage at small size (default run) and the real schedule (slow)."""

from __future__ import annotations

import json

import pytest

import uniret
from uniret.cli import main


def check_demo_dir(out, printed: str) -> None:
    reports = out / "reports"
    for name in ("untrained", "udon", "udon+superglobal"):
        assert {p.name for p in (reports / name).iterdir()} == {"metrics.json", "report.md", "report.html"}
    udon = json.loads((reports / "udon" / "metrics.json").read_text())
    sg = json.loads((reports / "udon+superglobal" / "metrics.json").read_text())
    assert udon["model"]["config_hash"] == sg["model"]["config_hash"]  # one trained model, two rerank settings
    assert (udon["rerank"], sg["rerank"]) == ("none", "superglobal")
    assert sg["embeddings"]["reused"] and sg["embeddings"]["store"] == udon["embeddings"]["store"]
    trained = json.loads((out / "run" / "model" / "config.json").read_text())
    assert trained["provenance"]["training"]["method"] == "udon"
    assert trained["config_hash"] == udon["model"]["config_hash"]
    assert f"HTML report: {(reports / 'udon' / 'report.html').resolve()}" in printed
    assert "one query, top 5 of the merged index" in printed
    # the demo ends with the one command that serves its index; the index holds the model copy, so
    # image queries work (here through the same search layer, with a demo image)
    assert f"uniret serve {out / 'index'} --images {out / 'data'}" in printed.splitlines()[-2]
    assert json.loads((out / "index" / "model" / "config.json").read_text())["config_hash"] == trained["config_hash"]
    image = next((out / "data" / "images").rglob("*.png"))
    assert uniret.open_index(out / "index").search(str(image), k=1)[0].rows
    for name in ("untrained", "udon", "udon+superglobal"):
        assert name in printed


def test_demo_small_then_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--scale", "0.25"]) == 0
    first = capsys.readouterr().out
    check_demo_dir(out, first)
    udon = json.loads((out / "reports" / "udon" / "metrics.json").read_text())
    # the table printed is the reports' numbers
    assert f"{udon['results']['merged']['mean']['R@1']:.4f}" in first
    # a second run trains nothing and embeds nothing
    assert main(["demo", "--out", str(out), "--steps", "2", "--scale", "0.25"]) == 0
    again = json.loads((out / "reports" / "udon" / "metrics.json").read_text())
    assert again["embeddings"]["reused"] and again["results"] == udon["results"]
    assert capsys.readouterr().out.count("HTML report:") == 1


def test_demo_bad_options(tmp_path, capsys):
    # out-of-range values are usage errors (exit 2), one line each
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps must be in [2, 1000000], not 0"
    assert main(["demo", "--out", str(tmp_path / "d"), "--scale", "-1"]) == 2
    assert "--scale must be" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_full_schedule_beats_untrained(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    check_demo_dir(out, capsys.readouterr().out)
    mean = {name: json.loads((out / "reports" / name / "metrics.json").read_text())["results"]["merged"]["mean"]
            for name in ("untrained", "udon")}
    assert mean["udon"]["mAP@100"] > mean["untrained"]["mAP@100"] + 0.05
