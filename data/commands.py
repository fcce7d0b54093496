"""CLI: ``uniret data check|pack|demo``."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from ..display import OutputFormat, emit

app = typer.Typer(no_args_is_help=True)


class ImageFormat(str, Enum):
    jpeg = "jpeg"
    png = "png"


InfoDir = typer.Option("info", "--info-dir", help="Folder of <domain>/<split>.json, relative to ROOT (UnED: info_files).")
ImageRoot = typer.Option(None, "--image-root", help="Folder the record paths are relative to (default ROOT/images).")


@app.command("check")
def check(
    root: Path = typer.Argument(..., help="Collection root, packed LMDB store, or image folder with class "
                                          "subfolders (root/<class>/<image>)."),
    info_dir: str = InfoDir,
    image_root: str = ImageRoot,
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Validate a collection and print images, classes and images per class for each split."""
    from .validate import check_collection

    res = check_collection(root, info_dir=info_dir, image_root=image_root)
    emit(res.rows, ["domain", "split", "images", "classes", "min", "median", "max"], fmt,
         title="; ".join(res.notes) or None,
         extra={"errors": res.errors, "warnings": res.warnings, "notes": res.notes, "ok": res.ok})
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)
    for e in res.errors:
        typer.echo(f"error: {e}", err=True)
    if not res.ok:
        typer.echo(f"{root}: {len(res.errors)} problem(s); fix them and run `uniret data check` again", err=True)
        raise typer.Exit(1)


@app.command("pack")
def pack_command(
    root: Path = typer.Argument(..., help="Collection root."),
    out: Path = typer.Argument(..., help="Output LMDB directory (e.g. demo.lmdb)."),
    max_side: int = typer.Option(256, "--max-side", help="Longer image side after resizing (never enlarges)."),
    quality: int = typer.Option(90, "--quality", help="JPEG quality."),
    image_format: ImageFormat = typer.Option(ImageFormat.jpeg, "--image-format", help="Encoding of the stored images."),
    workers: int = typer.Option(0, "--workers", help="Encoding processes (0: in this process)."),
    info_dir: str = InfoDir,
    image_root: str = ImageRoot,
    overwrite: bool = typer.Option(False, "--overwrite", "--force",
                                   help="Replace an earlier packed store at OUT (never another kind of directory)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Resize and re-encode every image once into one LMDB store (resumable)."""
    from .store import PackOptions, pack

    summary = pack(root, out, PackOptions(max_side, quality, image_format.value), workers=workers,
                   info_dir=info_dir, image_root=image_root, overwrite=overwrite)
    rows = [{"domain": d, "split": s, "images": n} for d, sp in summary["domains"].items() for s, n in sp.items()]
    emit(rows, ["domain", "split", "images"], fmt, extra={"skipped": summary["skipped"], "out": str(out)})
    if summary["skipped"]:
        typer.echo(f"skipped {len(summary['skipped'])} unreadable image(s):", err=True)
        for s in summary["skipped"]:
            typer.echo(f"  {s['domain']}/{s['split']}/{s['path']}: {s['error']}", err=True)
    typer.echo(f"packed {summary['packed']} of {summary['images']} images into {out}", err=True)


@app.command("demo")
def demo(
    out: Path = typer.Argument(..., help="Where to write the demo collection."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same images."),
    scale: float = typer.Option(1.0, "--scale", help="Multiplies the number of classes per domain."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo collection at OUT."),
) -> None:
    """Write the small procedurally drawn demo collection (4 domains, ~1000 images, seconds)."""
    from .demo import make_demo

    summary = make_demo(out, seed=seed, scale=scale, overwrite=overwrite)
    rows = [{"domain": d, **sp} for d, sp in summary["domains"].items()]
    emit(rows, ["domain", "train", "val", "test", "index"], "table")
    print(f"wrote the demo collection to {out}", file=sys.stderr)
