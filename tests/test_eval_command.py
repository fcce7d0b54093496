"""`uniret eval` end to end on the demo collection with a tiny untrained model, and `eval compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from uniret.cli import main
from uniret.eval.metrics import retrieval_metrics
from uniret.index.rerank import RERANKERS


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from uniret.embed.model import build_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "model"
    build_model("timm:test_vit", dim=16, image_size=32).save(out)
    return out


@pytest.fixture(scope="module")
def report_dir(tiny_model, demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "both"
    assert main(["eval", "--model", str(tiny_model), "--data", str(demo_root), "--out", str(out),
                 "--protocol", "both", "--samples", "2"]) == 0
    return out


def brute_force(report: dict, store_path, demo_root):
    """Recompute the merged and separate metrics from the cached store with a full numpy sort."""
    from uniret.data import open_collection
    from uniret.embed.store import EmbeddingStore

    store = EmbeddingStore(store_path)
    items, x = store.items, np.asarray(store.embeddings, dtype=np.float32)
    coll = open_collection(demo_root)
    out = {}
    for protocol in ("merged", "separate"):
        q_rows, x_rows = [], []
        for d in coll.domains:
            qs, xs = coll.query_index_splits(d, "test")
            q_rows += [i for i, it in enumerate(items) if (it.domain, it.split) == (d, qs)]
            x_rows += [i for i, it in enumerate(items) if (it.domain, it.split) == (d, xs)]
        sims = x[q_rows] @ x[x_rows].T
        for qi, r in enumerate(q_rows):
            for xj, c in enumerate(x_rows):
                if r == c or (protocol == "separate" and items[r].domain != items[c].domain):
                    sims[qi, xj] = -np.inf  # the query itself / another domain's items
        ranked = np.argsort(-sims, axis=1, kind="stable")
        ranked = np.where(np.isfinite(np.take_along_axis(sims, ranked, axis=1)), ranked, -1)
        self_ids = [x_rows.index(r) if r in x_rows else -1 for r in q_rows]  # n_q leaves the query out
        out[protocol] = retrieval_metrics([(items[r].domain, items[r].class_ids) for r in q_rows],
                                          [(items[c].domain, items[c].class_ids) for c in x_rows], ranked[:, :100],
                                          query_ids=np.array(self_ids))
    return out


def test_eval_writes_three_files_with_correct_numbers(report_dir, demo_root):
    assert {p.name for p in report_dir.iterdir()} == {"metrics.json", "report.md", "report.html"}
    report = json.loads((report_dir / "metrics.json").read_text())
    assert report["protocol"] == "both" and report["model"]["config_hash"]
    assert report["data"]["domains"]["shapes"] == {"query_split": "test", "index_split": "index"}
    assert report["data"]["domains"]["glyphs"] == {"query_split": "test", "index_split": "test"}
    ref = brute_force(report, report["embeddings"]["store"], demo_root)
    for protocol in ("merged", "separate"):
        got = report["results"][protocol]
        assert got["mean"] == pytest.approx(ref[protocol]["mean"])
        for d, row in ref[protocol]["per_domain"].items():
            assert got["per_domain"][d] == pytest.approx(row)
    md = (report_dir / "report.md").read_text()
    assert "| glyphs |" in md and "mean (unweighted)" in md
    html = (report_dir / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") == 4 * 2 * 6  # 4 domains x 2 samples x (query + top 5)
    assert "http" not in html.replace("http-equiv", "")  # self-contained: nothing fetched


def test_one_metric_convention_in_terminal_and_reports(report_dir, tiny_model, demo_root, tmp_path, capsys):
    """Fractions with 4 decimals in the terminal table, report.md and report.html alike."""
    assert main(["eval", "--model", str(tiny_model), "--data", str(demo_root), "--out", str(tmp_path / "r"),
                 "--cache-dir", str(report_dir.parent / ".cache" / "embeddings")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    md, html = (tmp_path / "r" / "report.md").read_text(), (tmp_path / "r" / "report.html").read_text()
    values = [v for row in report["results"]["merged"]["per_domain"].values() for k, v in row.items() if "@" in k]
    assert len(values) == 4 * 3
    for v in values + list(report["results"]["merged"]["mean"].values()):
        shown = f"{v:.4f}"
        assert shown in printed and shown in md and shown in html, shown
    assert not any(f"{100 * v:.2f}" in md for v in values if v > 0.01)  # no percentages left


def test_second_run_reuses_embeddings(report_dir, tiny_model, demo_root, tmp_path, capsys):
    cache = json.loads((report_dir / "metrics.json").read_text())["embeddings"]["store"]
    out = tmp_path / "again"
    code = main(["eval", "--model", str(tiny_model), "--data", str(demo_root), "--out", str(out),
                 "--cache-dir", str(report_dir.parent / ".cache" / "embeddings"), "--format", "json"])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["embeddings"] == {**report["embeddings"], "reused": True, "store": cache}
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"][-1]["domain"] == "mean"


def test_rerank_and_compare(report_dir, tiny_model, demo_root, tmp_path, capsys):
    out = tmp_path / "aqe"
    assert main(["eval", "--model", str(tiny_model), "--data", str(demo_root), "--out", str(out),
                 "--rerank", "aqe", "--cache-dir", str(report_dir.parent / ".cache" / "embeddings")]) == 0
    capsys.readouterr()
    assert main(["eval", "compare", str(report_dir), str(out), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["protocol"], r["rerank"]) for r in rows] == [("merged", "none"), ("separate", "none"), ("merged", "aqe")]
    merged = json.loads((report_dir / "metrics.json").read_text())["results"]["merged"]
    assert rows[0]["mAP@100"] == pytest.approx(merged["mean"]["mAP@100"])
    assert rows[0]["glyphs mAP@100"] == pytest.approx(merged["per_domain"]["glyphs"]["mAP@100"])


def test_index_kind_searches_a_built_index(report_dir, tiny_model, demo_root, tmp_path):
    # HNSW over ~60 vectors finds the exact neighbours: the same numbers as exact search.
    out = tmp_path / "hnsw"
    cache = report_dir.parent / ".cache" / "embeddings"
    assert main(["eval", "--model", str(tiny_model), "--data", str(demo_root), "--out", str(out),
                 "--index-kind", "hnsw", "--cache-dir", str(cache)]) == 0
    got = json.loads((out / "metrics.json").read_text())["results"]["merged"]
    want = json.loads((report_dir / "metrics.json").read_text())["results"]["merged"]
    assert got["index"]["kind"] == "hnsw" and (cache / "indexes").is_dir()
    assert got["mean"] == pytest.approx(want["mean"])
    for d, row in want["per_domain"].items():
        assert got["per_domain"][d] == pytest.approx(row)


@pytest.mark.parametrize("args, message", [
    (["eval", "--format", "json"], "uniret eval needs data"),  # no --model: the default model
    (["eval", "--model", "{data}", "--data", "{data}"], "not a model directory"),
    (["eval", "--model", "{model}", "--data", "{data}/nope"], "no such file"),
    (["eval", "compare", "{data}"], "no metrics.json"),
])
def test_errors_are_one_line(args, message, tiny_model, demo_root, capsys):
    argv = [a.format(model=tiny_model, data=demo_root) for a in args]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("option, bad, choices", [
    ("--split", "train", ["test", "val"]),
    ("--protocol", "mixed", ["merged", "separate", "both"]),
    ("--rerank", "magic", ["none", *RERANKERS]),
    ("--index-kind", "bogus", ["flat", "ivf-pq", "hnsw"]),
])
def test_fixed_choices_are_usage_errors(option, bad, choices, tiny_model, demo_root, capsys):
    assert main(["eval", "--model", str(tiny_model), "--data", str(demo_root), option, bad]) == 2
    err = capsys.readouterr().err
    assert option in err and all(f"'{c}'" in err for c in choices) and "Traceback" not in err


def test_eval_on_packed_lmdb(tiny_model, demo_lmdb, report_dir, tmp_path, capsys):
    out = tmp_path / "lmdb"
    assert main(["eval", "--model", str(tiny_model), "--data", str(demo_lmdb), "--out", str(out),
                 "--split", "val", "--samples", "1"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    # stderr is not a terminal here: the embedding progress comes as plain lines, the last one a total
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("embedding: ")]
    assert progress and progress[-1].startswith(f"embedding: {report['embeddings']['count']} done in ")
    assert report["data"]["split"] == "val" and report["data"]["path"] == str(demo_lmdb.resolve())
    # val searches itself in every domain: one merged index of all val items, self match dropped
    assert all(v == {"query_split": "val", "index_split": "val"} for v in report["data"]["domains"].values())
    merged = report["results"]["merged"]
    assert merged["queries"] == report["embeddings"]["count"]
    assert (out / "report.html").read_text().count("data:image/jpeg;base64,") == 4 * 6


def test_python_api_matches_cli_report(report_dir, tiny_model, demo_root):
    from uniret.eval import evaluate

    report = evaluate(tiny_model, demo_root, protocol="separate",
                      cache_dir=report_dir.parent / ".cache" / "embeddings")
    assert report["embeddings"]["reused"] and "out" not in report
    want = json.loads((report_dir / "metrics.json").read_text())["results"]["separate"]
    assert report["results"]["separate"]["mean"] == pytest.approx(want["mean"])


def test_per_domain_models_oracle(tiny_model, report_dir, demo_root, tmp_path, capsys):
    """--model DOMAIN=DIR (Specialist + Oracle): one model per domain. With the same model for every
    domain the numbers equal the single-model report; a different model changes only its domain."""
    import torch

    from uniret.data import open_collection
    from uniret.embed.model import build_model

    domains = open_collection(demo_root).domains
    same = tmp_path / "same"
    args = [a for d in domains for a in ("--model", f"{d}={tiny_model}")]
    assert main(["eval", *args, "--data", str(demo_root), "--out", str(same), "--protocol", "both",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    single = json.loads((report_dir / "metrics.json").read_text())["results"]
    oracle = json.loads((same / "metrics.json").read_text())
    assert set(oracle["model"]["per_domain"]) == set(domains)
    for protocol in ("merged", "separate"):
        for d in domains:
            assert oracle["results"][protocol]["per_domain"][d] == pytest.approx(single[protocol]["per_domain"][d])

    torch.manual_seed(1)
    other = tmp_path / "other"
    build_model("timm:test_vit", dim=16, image_size=32).save(other)
    mixed = tmp_path / "mixed"
    args = [a for d in domains for a in ("--model", f"{d}={other if d == domains[0] else tiny_model}")]
    assert main(["eval", *args, "--data", str(demo_root), "--out", str(mixed), "--protocol", "separate",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads((mixed / "metrics.json").read_text())["results"]["separate"]["per_domain"]
    for d in domains[1:]:
        assert res[d] == pytest.approx(single["separate"]["per_domain"][d])
    assert res[domains[0]]["mAP@100"] != pytest.approx(single["separate"]["per_domain"][domains[0]]["mAP@100"])

    capsys.readouterr()
    assert main(["eval", "--model", f"{domains[0]}={tiny_model}", "--data", str(demo_root),
                 "--out", str(tmp_path / "x")]) == 1
    assert "no model for domain(s)" in capsys.readouterr().err
    assert main(["eval", "--model", f"{domains[0]}={tiny_model}", "--model", str(tiny_model),
                 "--data", str(demo_root), "--out", str(tmp_path / "y")]) == 1
