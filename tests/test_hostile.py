"""Hostile input: every command, fed each class of bad input through the real CLI (issue #11).

Each case asserts what a user must see: exit code 1 or 2, exactly one line on stderr, no traceback,
and every input and earlier output byte-identical afterwards (the trees are hashed before and
after). Classes: unwritable, read-only, under-a-file and full-disk outputs; outputs equal to or
inside inputs; foreign non-empty directories; a previous output without ``--overwrite``; tampered
JSON; truncated or damaged binary files (npy, faiss, LMDB, safetensors); planted pickles (whose
payload would create a marker file); record paths that escape the image root, symlinks, FIFOs and
devices as images; NaN/inf vectors; out-of-range and wrong-type numbers; unknown names; two
writers of one output. Crash classes (SIGBUS, hangs) run in a subprocess, as a user would see them.

Exceptions to "one line", on purpose: ``data check`` prints one line per problem plus a summary
(it is a report of problems); ``pack``/``embed`` skip unsafe records with exit 0 and list them
(one warning line each). Full-disk cases need a tiny tmpfs (``unshare -m``, root or user
namespaces); without one they fall back to ``RLIMIT_FSIZE`` (EFBIG) in the same subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from uniret.cli import main

REPO = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------

def snapshot(*roots: Path) -> dict:
    """Every path under ``roots`` with its content hash (symlinks by target; FIFOs and devices by kind)."""
    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            out[str(root)] = None
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = "-> " + os.readlink(p)
                elif p.is_dir():
                    out[str(p)] = "dir"
                elif p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
                else:
                    out[str(p)] = "special"
    return out


def one_line(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def refused(capfd, args, *trees, codes=(1, 2), match: str | None = None) -> str:
    """Run ``uniret ARGS`` in this process; assert a refusal as the user must see it; return the line."""
    capfd.readouterr()
    before = snapshot(*trees)
    code = main([str(a) for a in args])
    _, err = capfd.readouterr()
    lines = one_line(err)
    assert code in codes, f"exit {code}, expected {codes}: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    if match:
        assert re.search(match, lines[0], re.I), lines[0]
    assert snapshot(*trees) == before, "a refused command changed its inputs or earlier outputs"
    return lines[0]


def subprocess_cli(args, timeout: float = 120, env: dict | None = None, prefix: list[str] | None = None,
                   cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m uniret.cli ARGS`` as a user runs it (crash classes: SIGBUS, hangs, tracebacks)."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO.parent)] + [p for p in sys.path if p])
    cmd = [*(prefix or []), sys.executable, "-m", "uniret.cli", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def assert_clean_failure(done: subprocess.CompletedProcess, match: str | None = None) -> str:
    lines = one_line(done.stderr)
    assert done.returncode in (1, 2), f"exit {done.returncode} (negative: killed by a signal): {done.stderr}"
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    if match:
        assert re.search(match, lines[0], re.I), lines[0]
    return lines[0]


class Payload:
    """Unpickling this creates the file ``MARKER`` (a stand-in for running any code)."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_bytes(marker: Path) -> bytes:
    p = Payload()
    p.marker = marker
    return pickle.dumps(p)


def object_npy(path: Path, marker: Path) -> None:
    """A valid .npy whose object array unpickles the payload (np.load(allow_pickle=True) would run it)."""
    p = Payload()
    p.marker = marker
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = p, p
    np.save(path, arr, allow_pickle=True)


def write_collection(root: Path, domains=("alpha", "beta"), size: int = 16) -> Path:
    """A tiny collection: per domain, 2 classes x 2 images in train, val and test (24 images each)."""
    rng = np.random.default_rng(0)
    for d_i, domain in enumerate(domains):
        cid = 0
        for split in ("train", "val", "test"):
            records = []
            for _ in range(2):
                base = rng.integers(0, 255, 3)
                for j in range(2):
                    rel = f"{domain}/{cid}_{j}.png"
                    img = (np.ones((size, size, 3)) * base + rng.integers(0, 40, (size, size, 3))).clip(0, 255)
                    (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img.astype(np.uint8)).save(root / "images" / rel)
                    records.append({"path": rel, "class_id": cid})
                cid += 1
            (root / "info" / domain).mkdir(parents=True, exist_ok=True)
            (root / "info" / domain / f"{split}.json").write_text(json.dumps(records))
        del d_i
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny collection, its packed store, a model, a store, an index and a report, made through the CLI."""
    base = tmp_path_factory.mktemp("hostile")
    w = SimpleNamespace(base=base, coll=write_collection(base / "coll"), lmdb=base / "coll.lmdb",
                        model=base / "model", store=base / "store", index=base / "index", report=base / "report")
    assert main(["data", "pack", w.coll, w.lmdb, "--max-side", "16"]) == 0
    assert main(["model", "init", "--backbone", "timm:test_resnet", "--out", w.model, "--dim", "8",
                 "--image-size", "32"]) == 0
    assert main(["embed", "--model", w.model, "--data", w.coll, "--out", w.store, "--workers", "0",
                 "--device", "cpu", "--batch-size", "16"]) == 0
    assert main(["index", "build", w.store, "--out", w.index]) == 0
    assert main(["eval", "--model", w.model, "--data", w.coll, "--out", w.report, "--device", "cpu",
                 "--k", "10", "--samples", "1", "--cache-dir", base / "cache"]) == 0
    w.file = base / "a-file.txt"
    w.file.write_text("not a directory\n")
    w.trees = [w.coll, w.lmdb, w.model, w.store, w.index, w.report, w.file]
    return w


def copy_of(src: Path, tmp_path: Path, name: str | None = None) -> Path:
    dst = tmp_path / (name or src.name)
    shutil.copytree(src, dst, symlinks=True)
    return dst


# -- outputs never destroy what uniret did not make ------------------------------------------------

def writer_args(w, name: str, out: Path, cache: Path) -> list:
    """The command line of each writing command with output ``out``."""
    return {
        "data demo": ["data", "demo", out, "--scale", "0.05"],
        "data pack": ["data", "pack", w.coll, out, "--max-side", "16"],
        "model init": ["model", "init", "--backbone", "timm:test_resnet", "--out", out, "--dim", "8",
                       "--image-size", "32"],
        "embed": ["embed", "--model", w.model, "--data", w.coll, "--out", out, "--workers", "0", "--device", "cpu"],
        "index build": ["index", "build", w.store, "--out", out],
        "eval": ["eval", "--model", w.model, "--data", w.coll, "--out", out, "--device", "cpu", "--k", "10",
                 "--cache-dir", cache],
        "train": ["train", "--data", w.coll, "--out", out, "--backbone", "timm:test_resnet", "--image-size", "32",
                  "--steps", "2", "--batch-size", "4", "--device", "cpu", "--val-every", "0"],
        "demo": ["demo", "--out", out, "--steps", "2", "--scale", "0.05", "--device", "cpu"],
    }[name]


WRITERS = ["data demo", "data pack", "model init", "embed", "index build", "eval", "train", "demo"]


@pytest.mark.parametrize("name", WRITERS)
def test_output_under_a_file(world, name, tmp_path, capfd):
    refused(capfd, writer_args(world, name, world.file / "sub", tmp_path / "cache"), *world.trees, tmp_path,
            match="file|directory")


@pytest.mark.parametrize("name", WRITERS)
def test_output_is_a_file(world, name, tmp_path, capfd):
    refused(capfd, writer_args(world, name, world.file, tmp_path / "cache"), *world.trees, tmp_path)


@pytest.mark.parametrize("name", WRITERS)
def test_output_is_a_foreign_non_empty_directory(world, name, tmp_path, capfd):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work\n")
    refused(capfd, writer_args(world, name, foreign, tmp_path / "cache"), *world.trees, tmp_path,
            match="not a|never|exists")
    # not even --overwrite / --force makes a foreign directory replaceable
    flag = {"data pack": "--force", "train": None, "demo": None, "data demo": "--overwrite"}.get(name, "--overwrite")
    if flag:
        refused(capfd, [*writer_args(world, name, foreign, tmp_path / "cache"), flag], *world.trees, tmp_path)


INSIDE = {  # (name, output given the world): an output equal to or inside one of the command's inputs
    "data pack = input": ("data pack", lambda w: w.coll),
    "data pack in input": ("data pack", lambda w: w.coll / "images" / "packed"),
    "data pack holds input": ("data pack", lambda w: w.coll.parent),
    "embed = data": ("embed", lambda w: w.coll),
    "embed in data": ("embed", lambda w: w.coll / "info" / "emb"),
    "embed = model": ("embed", lambda w: w.model),
    "index build = store": ("index build", lambda w: w.store),
    "index build in store": ("index build", lambda w: w.store / "idx"),
    "eval = data": ("eval", lambda w: w.coll),
    "eval in data": ("eval", lambda w: w.coll / "report"),
    "eval in model": ("eval", lambda w: w.model / "report"),
    "train in data": ("train", lambda w: w.coll / "run"),
}


@pytest.mark.parametrize("case", INSIDE)
def test_output_equal_to_or_inside_an_input(world, case, tmp_path, capfd):
    name, out = INSIDE[case]
    refused(capfd, writer_args(world, name, out(world), tmp_path / "cache"), *world.trees, tmp_path,
            match="inside|contains|input|not a|exists")


def test_model_init_over_its_own_backbone(world, capfd):
    refused(capfd, ["model", "init", "--backbone", world.model, "--out", world.model, "--dim", "8"], *world.trees)


OWN = {  # a previous output of the same kind: replaced only with --overwrite
    "data pack": lambda w: w.lmdb,
    "model init": lambda w: w.model,
    "embed": lambda w: w.store,
    "index build": lambda w: w.index,
    "eval": lambda w: w.report,
}


@pytest.mark.parametrize("name", OWN)
def test_own_previous_output_needs_overwrite(world, name, tmp_path, capfd):
    args = writer_args(world, name, OWN[name](world), tmp_path / "cache")
    if name == "embed":
        args += ["--domain", "alpha"]  # other inputs than the store was made from
    if name == "model init":
        args += ["--seed", "1"]
    refused(capfd, args, *world.trees, tmp_path, match="--overwrite|--force")


@pytest.mark.parametrize("name", WRITERS)
def test_second_writer_of_one_output_is_refused(world, name, tmp_path, capfd):
    from uniret.guards import output_lock

    out = tmp_path / "out"
    with output_lock(out):  # another uniret command is writing it
        refused(capfd, writer_args(world, name, out, tmp_path / "cache"), *world.trees,
                match="another uniret command")
    assert not out.exists()
