"""Report directories: metrics.json (every number), report.md (tables) and report.html.

report.html is one static, self-contained page (inline CSS, thumbnails embedded as base64 JPEG): a
per-domain table with bars for each protocol, and a grid of sample queries with their top-5 results,
correct ones marked. It needs no server and no network. :func:`compare_rows` lines up several
reports for ``uniret eval compare``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from ..display import format_metric
from ..errors import ImageDecodeError, UniretError
from ..utils import atomic_write_json, atomic_write_text, publish_dir, read_json

THUMB = 64  # pixels of the longer side of a thumbnail
TOP = 5  # results shown per sample query


def thumbnail(image_bytes: bytes, size: int = THUMB) -> str | None:
    """A small JPEG as a ``data:`` URI, or None when the image cannot be decoded."""
    from ..data.images import decode_image

    try:
        img = decode_image(image_bytes)
    except ImageDecodeError:
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sample_queries(result: dict, q_items: list, x_items: list, source, per_domain: int = 4) -> list[dict]:
    """Evenly spaced evaluated queries of each domain with their top-5 results and thumbnails.

    ``source`` answers ``get_image_bytes(domain, split, position)`` (a collection).
    """
    pq = result["per_query"]
    ranked, rel, valid = pq["ranked_ids"], pq["relevant"], pq["valid"]

    def entry(item, **extra):
        return {"path": item.path, "domain": item.domain, "split": item.split,
                "class_ids": list(item.class_ids),
                "thumb": thumbnail(source.get_image_bytes(item.domain, item.split, item.position)), **extra}

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
             f"- model: `{report['model'].get('dir')}` (config {report['model']['config_hash']})",
             f"- data: `{report['data']['path']}`",
             f"- rerank: {report['rerank']}; index: {report['index_kind']}; k = {report['k']}", ""]
    for name, summary in report["results"].items():
        keys = metric_keys(summary)
        lines += [f"## {name} protocol", "", "| domain | " + " | ".join(keys) + " | queries | excluded |",
                  "|---|" + "---:|" * (len(keys) + 2)]
        for d, row in summary["per_domain"].items():
            lines.append(f"| {d} | " + " | ".join(format_metric(row[m]) for m in keys)
                         + f" | {row['queries']} | {row['excluded']} |")
        lines.append("| **mean (unweighted)** | " + " | ".join(f"**{format_metric(summary['mean'][m])}**" for m in keys)
                     + f" | {summary['queries']} | {summary['excluded']} |")
        lines.append("")
    lines.append("Queries with no relevant index item (n_q = 0) are excluded and counted.")
    return "\n".join(lines) + "\n"


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 20px}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}tr.mean td{font-weight:bold;border-top:2px solid #888}
.bar{display:inline-block;height:10px;background:#4a7bd0;vertical-align:middle;margin-right:6px}
.grid{display:flex;flex-direction:column;gap:6px}.row{display:flex;gap:6px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:11px;width:72px}figure img{width:64px;height:64px;object-fit:cover;border:3px solid #ccc}
figure.query img{border-color:#333}figure.hit img{border-color:#1a9a3a}figure.miss img{border-color:#d33}
.sep{width:14px}.meta{font-size:12px;color:#555}
"""


def render_html(report: dict, grid: list[dict]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>uniret evaluation: {esc(report['data']['split'])}</title><style>{CSS}</style></head><body>",
             f"<h1>Retrieval evaluation ({esc(report['data']['split'])} split)</h1>",
             f"<p class='meta'>model {esc(str(report['model'].get('dir')))} (config {esc(report['model']['config_hash'])})"
             f" &middot; data {esc(report['data']['path'])} &middot; rerank {esc(report['rerank'])}"
             f" &middot; index {esc(report['index_kind'])} &middot; k = {report['k']}</p>"]
    for name, summary in report["results"].items():
        keys = metric_keys(summary)
        parts.append(f"<h2>{esc(name)} protocol</h2><table class='metrics' id='metrics-{esc(name)}'><thead><tr>"
                     "<th>domain</th>" + "".join(f"<th>{esc(m)}</th>" for m in keys)
                     + "<th>queries</th><th>excluded</th></tr></thead><tbody>")
        rows = list(summary["per_domain"].items()) + [("mean (unweighted)", {**summary["mean"],
                                                       "queries": summary["queries"], "excluded": summary["excluded"]})]
        for i, (d, row) in enumerate(rows):
            cls = " class='mean'" if i == len(rows) - 1 else ""
            cells = "".join(
                f"<td><span class='bar' style='width:{0 if row[m] is None else round(100 * row[m])}px'></span>"
                f"{format_metric(row[m])}</td>" for m in keys)
            parts.append(f"<tr{cls}><td>{esc(d)}</td>{cells}<td>{row['queries']}</td><td>{row['excluded']}</td></tr>")
        parts.append("</tbody></table>")
    parts.append(f"<h2>Sample queries and their top-{TOP}</h2>"
                 "<p class='meta'>green border: relevant (same domain and class); red: not relevant.</p>"
                 "<div class='grid'>")
    for sample in grid:
        q = sample["query"]
        cells = [_figure(q, "query", f"{q['domain']} query")]
        cells.append("<div class='sep'></div>")
        for r in sample["results"]:
            mark = "&#10003;" if r["relevant"] else "&#10007;"
            cells.append(_figure(r, "hit" if r["relevant"] else "miss", f"{r['rank']} {mark}"))
        parts.append("<div class='row sample'>" + "".join(cells) + "</div>")
    # Records how many thumbnails the browser decoded (read by the headless-browser test).
    parts.append("</div><script>window.addEventListener('load',function(){document.body.dataset.decodedImages="
                 "Array.prototype.filter.call(document.images,function(i){return i.naturalWidth>0}).length;});"
                 "</script></body></html>")
    return "\n".join(parts) + "\n"


def _figure(entry: dict, cls: str, caption: str) -> str:
    title = html.escape(f"{entry['path']} classes {entry['class_ids']}", quote=True)
    img = (f"<img src='{entry['thumb']}' alt='{title}' title='{title}'>" if entry.get("thumb")
           else f"<div title='{title}'>(unreadable)</div>")
    return f"<figure class='{cls}'>{img}<figcaption>{caption}</figcaption></figure>"


def write_report(out: str | Path, report: dict, grid: list[dict]) -> None:
    """Write the three files into a temporary directory and publish it as ``out`` in one rename."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
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
    except (OSError, json.JSONDecodeError) as exc:
        raise UniretError(f"{p}: unreadable report ({exc})") from None
    if report.get("format") != "uniret-eval-report/1":
        raise UniretError(f"{p}: not a uniret evaluation report")
    return report


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
                row[f"{d} {metric}"] = values[metric]
                if d not in domains:
                    domains.append(d)
            rows.append(row)
    return rows, [*COMPARE_LABELS, *means, *(f"{d} {metric}" for d in domains)]
