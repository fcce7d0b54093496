"""CLI: ``uniret eval`` (run an evaluation) and ``uniret eval compare``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from typer.core import TyperGroup

from ..display import OutputFormat, emit
from ..errors import UniretError
from ..guards import in_range
from ..index.commands import RerankChoice
from ..index.keys import KINDS


class Split(str, Enum):
    test = "test"
    val = "val"


class Protocol(str, Enum):
    merged = "merged"
    separate = "separate"
    both = "both"


#: ``--index-kind``: flat (exact search) or a kind of ``uniret index build`` (no free factory strings).
IndexKind = Enum("IndexKind", {kind: kind for kind in KINDS}, type=str)

#: Largest --k: mAP@k over more than 10,000 results is no longer instance retrieval, and the (queries, k)
#: result arrays must fit in memory.
MAX_K = 10_000

class _EvalGroup(TyperGroup):
    """``uniret eval FOLDER [options]``: a bare path (not a subcommand name, not an option's value) is
    ``--data FOLDER``; the group keeps its ``compare`` subcommand."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        takes_value = {opt for p in self.params if getattr(p, "param_type_name", "") == "option"
                       and not getattr(p, "is_flag", False) and not getattr(p, "count", False) for opt in p.opts}
        args = list(args)
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--":
                break
            if token.startswith("-"):
                i += 2 if token in takes_value else 1
                continue
            if token not in self.commands:
                args[i:i + 1] = ["--data", token]
            break
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    help="Evaluate retrieval the UnED way (mMP@5, mAP@100, R@1; merged and separate protocols). "
         "`uniret eval FOLDER`: an image folder with class subfolders, every image searched against the others.",
    invoke_without_command=True,
    cls=_EvalGroup,
)


@eval_app.callback()
def eval_main(
    ctx: typer.Context,
    model: list[str] = typer.Option(None, "--model",
                                    help="Model directory (or training run). Repeat as DOMAIN=DIR to embed each "
                                         "domain with its own model (Specialist + Oracle)."),
    data: Path = typer.Option(None, "--data", help="Collection root, packed LMDB store, or image folder with class "
                                                  "subfolders (also as the first argument: uniret eval FOLDER)."),
    split: Split = typer.Option("test", "--split", help="Evaluate on the test or the val split."),
    protocol: Protocol = typer.Option("merged", "--protocol",
                                      help="merged (one index of all domains), separate (per domain) or both."),
    rerank: RerankChoice = typer.Option("none", "--rerank", help="Global-feature reranking of the top candidates."),
    index_kind: IndexKind = typer.Option("flat", "--index-kind",
                                         help="flat (exact search) or an index kind of `uniret index build` for the "
                                              "merged index."),
    out: Path = typer.Option(Path("eval-report"), "--out", help="Report directory (metrics.json, report.md, report.html)."),
    cache_dir: Path = typer.Option(None, "--cache-dir",
                                   help="Where embeddings are cached (default: .cache/embeddings next to the report)."),
    k: int = typer.Option(100, "--k", help="Results per query (mAP@k)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... (default: a GPU when there is one)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per embedding batch."),
    workers: int = typer.Option(0, "--workers", help="Image decoding worker processes."),
    samples: int = typer.Option(4, "--samples", help="Sample queries per domain in report.html."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier report in --out."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Embed the query and index splits (reusing cached embeddings), search, score and write a report."""
    if ctx.invoked_subcommand is not None:
        return
    if data is None:
        raise UniretError("uniret eval needs data: uniret eval FOLDER, or --data ROOT|LMDB (or a subcommand: compare)")
    if not model:
        model = [None]  # the default model (uniret.embed.default)
    in_range(k, "--k", 1, MAX_K)
    in_range(batch_size, "--batch-size", 1, 65_536)
    in_range(workers, "--workers", 0, 256)
    in_range(samples, "--samples", 0, 1000)
    from .run import evaluate

    report = evaluate(parse_models(model), data, split=split.value, protocol=protocol.value, rerank=rerank.value,
                      index_kind=index_kind.value, out=out, cache_dir=cache_dir, k=k, device=device,
                      batch_size=batch_size, workers=workers, samples=samples, overwrite=overwrite)
    print_report(report, fmt)
    typer.echo(f"report: {Path(out) / 'report.html'}", err=True)


def parse_models(values: list[str | None]) -> Path | dict[str, Path] | None:
    """One model directory, or DOMAIN=DIR pairs (one model per domain); ``[None]``: the default model."""
    if values == [None]:
        return None
    pairs = [v for v in values if "=" in v]
    if not pairs:
        if len(values) > 1:
            raise UniretError("give one --model DIR, or --model DOMAIN=DIR once per domain")
        return Path(values[0])
    if len(pairs) != len(values):
        raise UniretError("mix of --model DIR and --model DOMAIN=DIR: use one form")
    out: dict[str, Path] = {}
    for v in pairs:
        domain, _, path = v.partition("=")
        if not domain or not path or domain in out:
            raise UniretError(f"--model {v!r}: expected DOMAIN=DIR, each domain once")
        out[domain] = Path(path)
    return out


def print_report(report: dict, fmt: OutputFormat | str = "table") -> None:
    """Per-domain rows of every protocol in the report, the unweighted mean last."""
    from .report import metric_keys

    rows, columns = [], ["protocol", "domain"]
    for name, summary in report["results"].items():
        metrics = metric_keys(summary)
        columns += [m for m in metrics if m not in columns]
        for d, row in summary["per_domain"].items():
            rows.append({"protocol": name, "domain": d, **{m: row[m] for m in metrics},
                         "queries": row["queries"], "excluded": row["excluded"]})
        rows.append({"protocol": name, "domain": "mean", **summary["mean"],
                     "queries": summary["queries"], "excluded": summary["excluded"]})
    emit(rows, columns + ["queries", "excluded"], fmt,
         title=f"{report['data']['split']} split, rerank {report['rerank']}",
         extra={"report": {k: v for k, v in report.items() if k != "results"}}, metrics=columns[2:])


@eval_app.command("compare")
def eval_compare(
    reports: list[Path] = typer.Argument(..., help="Report directories written by `uniret eval --out`."),
    metric: str = typer.Option("mAP@100", "--metric", help="Metric shown per domain."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Print several reports side by side: mean metrics, then one metric per domain."""
    from .report import COMPARE_LABELS, compare_rows

    rows, columns = compare_rows([str(r) for r in reports], metric=metric)
    emit(rows, columns, fmt, metrics=columns[len(COMPARE_LABELS):])

