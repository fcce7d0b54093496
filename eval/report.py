"""Report directories: metrics.json (every number), report.md (tables) and report.html.

report.html is one static, self-contained page (inline CSS, thumbnails embedded as base64 JPEG ``data:``
URIs): a per-domain table with bars for each protocol, and a grid of sample queries with their top-5
results, correct ones marked. It needs no server and no network. It is rendered from
``templates/report.html`` by :mod:`uniret.pages`' Jinja2 environment, which autoescapes: domain
names, paths and model names are text, whatever characters they hold (report.md escapes them too). :func:`compare_rows` lines up several
reports for ``uniret eval compare``.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..display import format_metric
from ..errors import UniretError
from ..guards import has_format
from ..utils import atomic_write_json, atomic_write_text, publish_dir, read_json, scratch_dir

THUMB = 64  # pixels of the longer side of a thumbnail
TOP = 5  # results shown per sample query


def _thumbnail(source, item) -> str | None:
    """The item's thumbnail as a ``data:`` URI, or None when its image cannot be read or decoded
    (an unreadable file, or a record path that leaves the image root)."""
    from ..pages import thumbnail

    try:
        return thumbnail(source.get_image_bytes(item.domain, item.split, item.position), size=THUMB)
    except UniretError:
        return None


def sample_queries(result: dict, q_items: list, x_items: list, source, per_domain: int = 4) -> list[dict]:
    """Evenly spaced evaluated queries of each domain with their top-5 results and thumbnails.

    ``source`` answers ``get_image_bytes(domain, split, position)`` (a collection).
    """
    pq = result["per_query"]
    ranked, rel, valid = pq["ranked_ids"], pq["relevant"], pq["valid"]

    def entry(item, **extra):
        return {"path": item.path, "domain": item.domain, "split": item.split,
                "class_ids": list(item.class_ids),
                "thumb": _thumbnail(source, item), **extra}

    domains = np.array([it.domain for it in q_items], dtype=object)
    grid = []
    for d in dict.fromkeys(domains.tolist()):
        rows = np.flatnonzero((domains == d) & valid)
        if len(rows) == 0 or per_domain <= 0:
            continue
        picks = rows[np.unique(np.linspace(0, len(rows) - 1, min(per_domain, len(rows))).round().astype(int))]
        for qi in picks:
            results = [entry(x_items[j], relevant=bool(rel[qi, r]), rank=r + 1)
                       for r, j in enumerate(ranked[qi, :TOP]) if j >= 0]
            grid.append({"query": entry(q_items[qi]), "results": results, "n_q": int(pq["n_q"][qi])})
    return grid


def metric_keys(summary: dict) -> list[str]:
    """Metric names in the paper's order (mMP@k, mAP@k, R@1), whatever order the JSON has."""
    order = {"mMP": 0, "mAP": 1, "R": 2}
    return sorted(summary["mean"], key=lambda m: (order.get(m.split("@")[0], 3), m))


def render_markdown(report: dict) -> str:
    lines = [f"# Retrieval evaluation: {report['data']['split']} split", "",
             f"- model: `{_md(report['model'].get('dir'))}` (config {_md(report['model']['config_hash'])})",
             f"- data: `{_md(report['data']['path'])}`",
             f"- rerank: {report['rerank']}; index: {report['index_kind']}; k = {report['k']}", ""]
    for name, summary in report["results"].items():
        keys = metric_keys(summary)
        lines += [f"## {name} protocol", "", "| domain | " + " | ".join(keys) + " | queries | excluded |",
                  "|---|" + "---:|" * (len(keys) + 2)]
        for d, row in summary["per_domain"].items():
            lines.append(f"| {_md(d)} | " + " | ".join(format_metric(row[m]) for m in keys)
                         + f" | {row['queries']} | {row['excluded']} |")
        lines.append("| **mean (unweighted)** | " + " | ".join(f"**{format_metric(summary['mean'][m])}**" for m in keys)
                     + f" | {summary['queries']} | {summary['excluded']} |")
        lines.append("")
    lines.append("Queries with no relevant index item (n_q = 0) are excluded and counted.")
    return "\n".join(lines) + "\n"


def _md(value) -> str:
    """Text for a Markdown table cell: no raw HTML (a viewer may render it) and no cell breaks."""
    return html.escape(str(value)).replace("|", "\\|").replace("`", "'")


def render_html(report: dict, grid: list[dict]) -> str:
    """report.html from ``templates/report.html``: autoescaped, so a domain, path or model name
    with markup in it shows as text."""
    from ..pages import render

    tables = []
    for name, summary in report["results"].items():
        keys = metric_keys(summary)
        rows = list(summary["per_domain"].items()) + [("mean (unweighted)", {**summary["mean"],
                                                       "queries": summary["queries"], "excluded": summary["excluded"]})]
        tables.append({"name": name, "metrics": keys, "rows": [
            {"domain": d, "queries": row["queries"], "excluded": row["excluded"],
             "cells": [{"bar": 0 if row[m] is None else round(100 * row[m]), "text": format_metric(row[m])} for m in keys]}
            for d, row in rows]})
    return render("report.html", title=f"uniret evaluation: {report['data']['split']}", report=report,
                  tables=tables, grid=grid, top=TOP)


FORMAT = "uniret-eval-report/1"


def is_report(path: Path) -> bool:
    """A report directory of ``uniret eval`` (its metrics.json says so)."""
    return has_format(path, "metrics.json", FORMAT.split("/")[0])


def write_report(out: str | Path, report: dict, grid: list[dict]) -> None:
    """Write the three files into a new temporary directory and publish it as ``out`` in one rename
    (a failure, e.g. a full disk, removes the temporary directory and leaves ``out`` as it was)."""
    with scratch_dir(out) as tmp:
        atomic_write_json(tmp / "metrics.json", report)
        atomic_write_text(tmp / "report.md", render_markdown(report))
        atomic_write_text(tmp / "report.html", render_html(report, grid))
        publish_dir(tmp, out)


def load_report(path: str | Path) -> dict:
    """metrics.json of a report directory (or the file itself)."""
    p = Path(path)
    p = p / "metrics.json" if p.is_dir() else p
    if not p.is_file():
        raise UniretError(f"{path}: no metrics.json; give report directories written by `uniret eval --out`")
    try:
        report = read_json(p)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UniretError(f"{p}: unreadable report ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise UniretError(f"{p}: not a uniret evaluation report")
    if not _well_formed(report):
        raise UniretError(f"{p}: a damaged evaluation report (results are not per-protocol tables of numbers); "
                          "re-run `uniret eval`")
    return report


def _is_metrics(values) -> bool:
    return isinstance(values, dict) and all(
        isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
        for k, v in values.items())


def _well_formed(report: dict) -> bool:
    """The parts of metrics.json that ``eval compare`` reads, with the types it expects."""
    results = report.get("results")
    if not isinstance(results, dict) or not isinstance(report.get("rerank"), str):
        return False
    return all(isinstance(summary, dict) and _is_metrics(summary.get("mean"))
               and isinstance(summary.get("per_domain"), dict)
               and all(_is_metrics(row) for row in summary["per_domain"].values())
               for summary in results.values())


#: The label columns of :func:`compare_rows`; every other column holds a metric.
COMPARE_LABELS = ("report", "protocol", "rerank")


def compare_rows(paths: list[str], metric: str = "mAP@100") -> tuple[list[dict], list[str]]:
    """One row per (report, protocol): :data:`COMPARE_LABELS`, the mean metrics, then ``metric`` per
    domain."""
    rows, domains, means = [], [], []
    for path in paths:
        report = load_report(path)
        for name, summary in report["results"].items():
            means.extend(m for m in metric_keys(summary) if m not in means)
            if metric not in summary["mean"]:
                raise UniretError(f"{path}: no {metric!r} in the report; metrics there: {', '.join(summary['mean'])}")
            row = {"report": str(path), "protocol": name, "rerank": report["rerank"], **summary["mean"]}
            for d, values in summary["per_domain"].items():
                row[f"{d} {metric}"] = values.get(metric)
                if d not in domains:
                    domains.append(d)
            rows.append(row)
    return rows, [*COMPARE_LABELS, *means, *(f"{d} {metric}" for d in domains)]
