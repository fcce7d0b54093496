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
import io
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
    """The lines of stderr that say something about the outcome ("loading model ..." only says that a
    model is being loaded, before anything can fail)."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("loading model ")]


def refused(capfd, args, *trees, codes=(1, 2), match: str | None = None, after_work: bool = False) -> str:
    """Run ``uniret ARGS`` in this process; assert a refusal as the user must see it; return the line.

    ``after_work``: the command fails only after real work (a model that gives NaN is found out by
    embedding with it), so its log and progress lines come first; the error must still be one line,
    the last one, and the only ``error:`` line."""
    capfd.readouterr()
    before = snapshot(*trees)
    code = main([str(a) for a in args])
    _, err = capfd.readouterr()
    lines = one_line(err)
    if after_work:
        assert lines and lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1, err
        lines = lines[-1:]
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
    cmd = [*(prefix or []), sys.executable, "-m", "uniret.cli", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env(env), cwd=cwd)


def _child_env(extra: dict | None = None) -> dict:
    """This environment, with the uniret that these tests import first on the path."""
    import uniret

    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(uniret.__file__).parent.parent), env.get("PYTHONPATH", "")])
    return env


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
    for k in (0, 1):  # two parts of the same embedding, as two machines would write them
        assert main(["embed", "--model", w.model, "--data", w.coll, "--out", base / f"part{k}", "--part", f"{k}/2",
                     "--workers", "0", "--device", "cpu"]) == 0
    w.parts = [base / "part0", base / "part1"]
    assert main(["index", "build", w.store, "--out", w.index]) == 0
    assert main(["eval", "--model", w.model, "--data", w.coll, "--out", w.report, "--device", "cpu",
                 "--k", "10", "--samples", "1", "--cache-dir", base / "cache"]) == 0
    w.file = base / "a-file.txt"
    w.file.write_text("not a directory\n")
    w.trees = [w.coll, w.lmdb, w.model, w.store, w.index, w.report, w.file, *w.parts]
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
        "store merge": ["store", "merge", *w.parts, "--out", out],
    }[name]


# Cases that belong to another engineer's half of issue #11 and fail on main until it lands (strict=False:
# an XPASS just means it landed; then delete the entry).
PENDING: dict[str, str] = {}


def pending(*names: str):
    """Parameters with an xfail mark for the names in PENDING."""
    return [pytest.param(n, marks=pytest.mark.xfail(reason=PENDING[n.split()[0]], strict=False))
            if n.split()[0] in PENDING else n for n in names]


WRITERS = pending("data demo", "data pack", "model init", "embed", "index build", "eval", "train", "demo",
                  "store merge")


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
    "store merge in a part": ("store merge", lambda w: w.parts[0] / "merged"),
    "store merge = a part": ("store merge", lambda w: w.parts[1]),
}


@pytest.mark.parametrize("case", pending(*INSIDE))
def test_output_equal_to_or_inside_an_input(world, case, tmp_path, capfd):
    name, out = INSIDE[case]
    refused(capfd, writer_args(world, name, out(world), tmp_path / "cache"), *world.trees, tmp_path,
            match="inside|contains|input|not a|exists")


def test_model_init_over_its_own_backbone(world, capfd):
    refused(capfd, ["model", "init", "--backbone", world.model, "--out", world.model, "--dim", "8"], *world.trees)


OWN = {  # a previous output of the same kind: replaced only with --overwrite
    "data pack": lambda w: w.lmdb,
    "store merge": lambda w: w.store,
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


# -- nothing is unpickled: a payload planted in every file uniret reads --------------------------

def plant(kind: str, target: Path, marker: Path) -> None:
    """Replace ``target`` with a pickle payload: an object .npy, raw pickle bytes, or a pickle as an
    LMDB value (``target`` = env dir, key after ``:``)."""
    if kind == "npy":
        target.unlink()
        object_npy(target, marker)
    elif kind == "raw":
        target.write_bytes(pickle_bytes(marker))
    else:
        import lmdb

        env = lmdb.open(str(target), map_size=1 << 26)
        with env.begin(write=True) as txn:
            txn.put(kind.encode(), pickle_bytes(marker))
        env.close()


#: The one part of a store written by one process (embed/store/'s layout).
PART0 = "parts/part-00000-of-00001"


PICKLES = {  # case: (artefact copied, file planted (relative), how, command given the copy)
    "store embeddings (object npy) -> index build": ("store", f"{PART0}/embeddings.npy", "npy",
                                                     lambda w, c, t: ["index", "build", c, "--out", t / "i"]),
    "store embeddings (raw pickle) -> index build": ("store", f"{PART0}/embeddings.npy", "raw",
                                                     lambda w, c, t: ["index", "build", c, "--out", t / "i"]),
    "store manifest (raw pickle) -> index build": ("store", "manifest.json", "raw",
                                                   lambda w, c, t: ["index", "build", c, "--out", t / "i"]),
    "index ids -> index add": ("index", "v000001/ids.npy", "npy", lambda w, c, t: ["index", "add", c, w.store]),
    "index vectors -> index remove": ("index", "v000001/vectors.npy", "npy",
                                      lambda w, c, t: ["index", "remove", c, "--ids", t / "ids.txt"]),
    "index ids -> search": ("index", "v000001/ids.npy", "npy", lambda w, c, t: ["search", c, "id:0"]),
    "index vectors -> dedup": ("index", "v000001/vectors.npy", "npy", lambda w, c, t: ["dedup", c]),
    "index.faiss -> index add": ("index", "v000001/index.faiss", "raw", lambda w, c, t: ["index", "add", c, w.store]),
    "index manifest -> index info": ("index", "v000001/manifest.json", "raw", lambda w, c, t: ["index", "info", c]),
    "index metadata value -> search": ("index", "v000001/meta:id/0000000000000000", "lmdb",
                                       lambda w, c, t: ["search", c, "id:0"]),
    "model weights -> model info": ("model", "model.safetensors", "raw", lambda w, c, t: ["model", "info", c]),
    "model config -> embed": ("model", "config.json", "raw",
                              lambda w, c, t: ["embed", "--model", c, "--data", w.coll, "--out", t / "s"]),
    "packed store meta -> data check": ("lmdb", ":meta", "lmdb", lambda w, c, t: ["data", "check", c]),
    "packed store records -> embed": ("lmdb", ":rec/alpha/test", "lmdb",
                                      lambda w, c, t: ["embed", "--model", w.model, "--data", c, "--out", t / "s",
                                                       "--workers", "0", "--device", "cpu"]),
    "report metrics -> eval compare": ("report", "metrics.json", "raw", lambda w, c, t: ["eval", "compare", c]),
}


@pytest.mark.parametrize("case", PICKLES)
def test_planted_pickle_is_refused_and_never_run(world, case, tmp_path, capfd):
    artefact, rel, how, command = PICKLES[case]
    copy = copy_of(getattr(world, artefact), tmp_path)
    marker = tmp_path / "PWNED"
    (tmp_path / "ids.txt").write_text("0\n")
    if how == "lmdb":
        env_rel, key = rel.split(":")
        plant(key, copy / env_rel, marker)
    else:
        plant(how, copy / rel, marker)
    refused(capfd, command(world, copy, tmp_path), *world.trees, copy)
    assert not marker.exists(), "a planted pickle ran"


def test_pickled_query_npy_and_ids_npy_are_refused(world, tmp_path, capfd):
    marker = tmp_path / "PWNED"
    object_npy(tmp_path / "q.npy", marker)
    refused(capfd, ["search", world.index, tmp_path / "q.npy"], *world.trees)
    index = copy_of(world.index, tmp_path)
    refused(capfd, ["index", "remove", index, "--ids", tmp_path / "q.npy"], *world.trees, index)
    (tmp_path / "w.pth").write_bytes(pickle_bytes(marker))  # a torch checkpoint is a pickle
    refused(capfd, ["model", "init", "--backbone", "timm:test_resnet", "--weights", tmp_path / "w.pth",
                    "--out", tmp_path / "m", "--image-size", "32"], *world.trees, match="weights")
    assert not marker.exists() and not (tmp_path / "m").exists()


def test_pickled_eval_cache_is_refused(world, tmp_path, capfd):
    cache = copy_of(world.base / "cache", tmp_path)
    marker = tmp_path / "PWNED"
    for npy in cache.rglob("embeddings.npy"):
        plant("npy", npy, marker)
    refused(capfd, ["eval", "--model", world.model, "--data", world.coll, "--out", tmp_path / "r", "--device", "cpu",
                    "--cache-dir", cache], *world.trees, cache)
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_pickled_training_checkpoint_is_refused(world, tmp_path, capfd, monkeypatch):
    run = tmp_path / "run"
    args = ["train", "--data", world.coll, "--out", run, "--backbone", "timm:test_resnet", "--image-size", "32",
            "--steps", "3", "--batch-size", "4", "--device", "cpu", "--val-every", "0", "--ckpt-every", "1"]
    monkeypatch.setenv("UNIRET_TEST_INTERRUPT_TRAIN", "2")  # a Ctrl-C before step 2: an unfinished run
    assert main([str(a) for a in args]) == 130
    monkeypatch.delenv("UNIRET_TEST_INTERRUPT_TRAIN")
    marker = tmp_path / "PWNED"
    planted = [f for f in (run / "checkpoints").rglob("*") if f.is_file()]
    assert planted
    for ckpt in planted:
        ckpt.write_bytes(pickle_bytes(marker))
    refused(capfd, [*args, "--resume"], *world.trees, run)
    assert not marker.exists(), "a planted checkpoint ran"


# -- tampered JSON and damaged binary files ---------------------------------------------------------

def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGED = {  # case: (artefact, damage(copy, tmp), command(world, copy, tmp))
    "model config dim is text": ("model", lambda c, t: edit_json(c / "config.json", lambda o: o.update(dim="abc")),
                                 lambda w, c, t: ["model", "info", c]),
    "model config input size negative": ("model", lambda c, t: edit_json(
        c / "config.json", lambda o: o["preprocess"].update(input_size=[3, -5, 32])), lambda w, c, t: ["model", "info", c]),
    "model config not json": ("model", lambda c, t: truncate(c / "config.json", 0.3),
                              lambda w, c, t: ["embed", "--model", c, "--data", w.coll, "--out", t / "s"]),
    "model weights truncated": ("model", lambda c, t: truncate(c / "model.safetensors"),
                                lambda w, c, t: ["model", "info", c]),
    "model weights of another shape": ("model", lambda c, t: shutil.copy(t / "wide" / "model.safetensors", c),
                                       lambda w, c, t: ["model", "info", c]),
    "store embeddings truncated": ("store", lambda c, t: truncate(c / PART0 / "embeddings.npy"),
                                   lambda w, c, t: ["index", "build", c, "--out", t / "i"]),
    "store manifest count wrong": ("store", lambda c, t: edit_json(c / "manifest.json", lambda o: o.update(count=10**6)),
                                   lambda w, c, t: ["index", "build", c, "--out", t / "i"]),
    "store manifest dim text": ("store", lambda c, t: edit_json(c / "manifest.json", lambda o: o.update(dim="8")),
                                lambda w, c, t: ["index", "add", w.index, c]),
    "store metadata not parquet": ("store", lambda c, t: (c / PART0 / "metadata.parquet").write_text("{not json\n"),
                                lambda w, c, t: ["index", "build", c, "--out", t / "i"]),
    "index ids truncated": ("index", lambda c, t: truncate(c / "v000001" / "ids.npy"),
                            lambda w, c, t: ["index", "add", c, w.store]),
    "index vectors truncated": ("index", lambda c, t: truncate(c / "v000001" / "vectors.npy"),
                                lambda w, c, t: ["search", c, "id:0"]),
    "index.faiss truncated": ("index", lambda c, t: truncate(c / "v000001" / "index.faiss"),
                              lambda w, c, t: ["search", c, "id:0"]),
    "index manifest dim text": ("index", lambda c, t: edit_json(c / "v000001" / "manifest.json",
                                                                lambda o: o.update(dim="8")),
                                lambda w, c, t: ["index", "info", c]),
    "index CURRENT points outside": ("index", lambda c, t: (c / "CURRENT").write_text("../../../etc\n"),
                                     lambda w, c, t: ["index", "info", c]),
    "index CURRENT absolute": ("index", lambda c, t: (c / "CURRENT").write_text(str(w_model_dir(t)) + "\n"),
                               lambda w, c, t: ["search", c, "id:0"]),
    "index CURRENT binary": ("index", lambda c, t: (c / "CURRENT").write_bytes(b"\xff\xfe\x00v1"),
                             lambda w, c, t: ["index", "remove", c, "--ids", t / "ids.txt"]),
    "split file wrong types": ("coll", lambda c, t: (c / "info" / "alpha" / "test.json").write_text(
        json.dumps([{"path": 5, "class_id": "a"}])), lambda w, c, t: ["embed", "--model", w.model, "--data", c,
                                                                     "--out", t / "s"]),
    "split file binary": ("coll", lambda c, t: (c / "info" / "alpha" / "val.json").write_bytes(b"\x80\x81\x82"),
                          lambda w, c, t: ["eval", "--model", w.model, "--data", c, "--out", t / "r", "--split", "val",
                                           "--cache-dir", t / "cache"]),
    "packed store data.mdb garbage": ("lmdb", lambda c, t: (c / "data.mdb").write_bytes(os.urandom(20000)),
                                      lambda w, c, t: ["data", "check", c]),
    "report results not a table": ("report", lambda c, t: edit_json(c / "metrics.json",
                                                                    lambda o: o.update(results={"merged": [1, 2]})),
                                   lambda w, c, t: ["eval", "compare", c]),
    "report metric is text": ("report", lambda c, t: edit_json(
        c / "metrics.json", lambda o: o["results"]["merged"]["mean"].update({"mAP@100": "high"})),
        lambda w, c, t: ["eval", "compare", c]),
}


def w_model_dir(tmp: Path) -> Path:
    return tmp / "wide"


@pytest.mark.parametrize("case", DAMAGED)
def test_tampered_or_damaged_file_is_one_line(world, case, tmp_path, capfd):
    artefact, damage, command = DAMAGED[case]
    if "another shape" in case or "absolute" in case:
        assert main(["model", "init", "--backbone", "timm:test_resnet", "--out", str(tmp_path / "wide"),
                     "--dim", "16", "--image-size", "32"]) == 0
    (tmp_path / "ids.txt").write_text("0\n")
    copy = copy_of(getattr(world, artefact), tmp_path)
    damage(copy, tmp_path)
    refused(capfd, command(world, copy, tmp_path), *world.trees, copy)


# -- record paths stay inside their root; only regular files are read ------------------------------

@pytest.fixture(scope="module")
def escaping(world, tmp_path_factory):
    """A collection whose records point outside the image root (.., absolute, symlinks), at a FIFO,
    at /dev/zero (through a symlink, and as a device node when we may make one) and at an oversized
    sparse file; plus one good image per split so that the commands have work to do."""
    base = tmp_path_factory.mktemp("escape")
    coll = write_collection(base / "coll", domains=("alpha",))
    secret = base / "secret.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(secret)
    images = coll / "images"
    (images / "link.png").symlink_to(secret)
    (images / "linkdir").symlink_to(base)
    (images / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(images / "fifo.png")
    with open(images / "huge.png", "wb") as f:
        f.truncate(65 << 20)  # over the 64 MB image limit (sparse: no disk used)
    bad = ["../../secret.png", str(secret), "link.png", "linkdir/secret.png", "zero.png", "fifo.png", "huge.png"]
    try:
        os.mknod(images / "dev.png", 0o600 | stat_chr(), os.makedev(1, 5))  # /dev/zero's numbers
        bad.append("dev.png")
    except (PermissionError, AttributeError):
        pass
    for split in ("train", "val", "test"):
        path = coll / "info" / "alpha" / f"{split}.json"
        records = json.loads(path.read_text())
        records += [{"path": p, "class_id": 0} for p in bad]
        path.write_text(json.dumps(records))
    return SimpleNamespace(base=base, coll=coll, secret=secret, bad=bad)


def stat_chr() -> int:
    import stat

    return stat.S_IFCHR


def test_data_check_reports_escaping_records(escaping, capfd):
    before = snapshot(escaping.base)
    assert main(["data", "check", str(escaping.coll)]) == 1
    _, err = capfd.readouterr()
    assert "Traceback" not in err and f"{len(escaping.bad)} record paths are refused" in err, err
    assert "outside the image root" in err
    assert snapshot(escaping.base) == before


def test_pack_skips_and_lists_escaping_records_without_hanging(escaping, tmp_path):
    # a subprocess with a timeout: a FIFO opened for reading would hang forever
    done = subprocess_cli(["data", "pack", escaping.coll, tmp_path / "p.lmdb", "--max-side", "16"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    skipped = json.loads(subprocess_cli(["data", "pack", escaping.coll, tmp_path / "q.lmdb", "--format", "json",
                                         "--max-side", "16"]).stdout)["skipped"]
    assert sorted({s["path"] for s in skipped}) == sorted(escaping.bad)
    import lmdb

    env = lmdb.open(str(tmp_path / "p.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        stored = [bytes(v) for k, v in txn.cursor() if bytes(k).startswith(b"img/")]
    env.close()
    assert len(stored) == 3 * 4  # only the good images
    assert all(v[:2] == b"\xff\xd8" for v in stored)  # JPEGs we encoded, none of the secret's bytes


def test_embed_and_eval_skip_escaping_records(escaping, world, tmp_path, capfd):
    import signal

    def hung(*_):
        raise TimeoutError("a FIFO or device was opened")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        assert main(["embed", "--model", str(world.model), "--data", str(escaping.coll), "--out",
                     str(tmp_path / "s"), "--workers", "0", "--device", "cpu"]) == 0
        from uniret.embed.store import EmbeddingStore

        store = EmbeddingStore(tmp_path / "s")
        failed = {store.items[int(i)].path for i in store.failed_ids}
        assert failed == set(escaping.bad)
        assert main(["eval", "--model", str(world.model), "--data", str(escaping.coll), "--out", str(tmp_path / "r"),
                     "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--samples", "8"]) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "secret" not in html  # never shown, even as a thumbnail of an escaping record


# -- HTML is escaped by construction ----------------------------------------------------------------

XSS = "<img src=x onerror=document.title='PWNED'>"


@pytest.fixture(scope="module")
def xss_report(world, tmp_path_factory):
    base = tmp_path_factory.mktemp("xss")
    coll = write_collection(base / "coll", domains=(XSS, "beta"))
    assert main(["eval", "--model", str(world.model), "--data", str(coll), "--out", str(base / "r"),
                 "--device", "cpu", "--cache-dir", str(base / "cache"), "--samples", "2"]) == 0
    return base / "r"


def test_markup_in_a_domain_name_is_text_in_the_report(xss_report):
    html = (xss_report / "report.html").read_text()
    assert XSS not in html and "&lt;img src=x onerror=" in html
    assert "<img src=x" not in (xss_report / "report.md").read_text()
    srcs = re.findall(r"<img [^>]*src=\"([^\"]*)\"", html)
    assert srcs and all(src.startswith("data:image/jpeg;base64,") for src in srcs)  # thumbnails inline only


@pytest.mark.browser
def test_markup_in_a_domain_name_does_not_run_in_chromium(xss_report, tmp_path):
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium installed")
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", "--dump-dom",
                           (xss_report / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<title>uniret evaluation" in done.stdout and "PWNED" not in done.stdout.split("</title>")[0]
    assert 'src="x"' not in done.stdout and "&lt;img src=x onerror=" in done.stdout


# -- NaN and inf stop at their source ------------------------------------------------------------

def test_non_finite_vectors_are_refused_by_index_build_and_add(world, tmp_path, capfd):
    from uniret.embed.store import EmbeddingStore, write_store

    store = EmbeddingStore(world.store)
    vectors = np.asarray(store.embeddings, dtype=np.float32).copy()
    vectors[3] = np.nan
    vectors[7, 0] = np.inf
    bad = write_store(tmp_path / "bad", vectors, store.items, model=store.manifest["model"])
    line = refused(capfd, ["index", "build", bad.path, "--out", tmp_path / "i"], *world.trees, bad.path,
                   match="2 vector")
    assert "3, 7" in line and not (tmp_path / "i").exists()
    index = copy_of(world.index, tmp_path)
    moved = [it.__class__(it.path + ".new", it.domain, it.split, it.position, it.class_ids) for it in store.items]
    new = write_store(tmp_path / "new", vectors, moved, model=store.manifest["model"])
    refused(capfd, ["index", "add", index, new.path], *world.trees, index, new.path, match="NaN or infinite")


def test_a_model_that_outputs_nan(world, tmp_path, capfd):
    import torch

    from uniret.embed.model import load_model

    model = load_model(world.model)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    model.save(tmp_path / "nan-model")
    # embed counts the rows as failures (a warning line), never stores NaN
    assert main(["embed", "--model", str(tmp_path / "nan-model"), "--data", str(world.coll), "--out",
                 str(tmp_path / "s"), "--workers", "0", "--device", "cpu"]) == 0
    from uniret.embed.store import EmbeddingStore

    s = EmbeddingStore(tmp_path / "s")
    assert len(s.failed_ids) == s.count and np.isfinite(np.asarray(s.embeddings)).all()
    capfd.readouterr()
    refused(capfd, ["index", "build", tmp_path / "s", "--out", tmp_path / "i"], *world.trees, match="no usable")
    refused(capfd, ["eval", "--model", tmp_path / "nan-model", "--data", world.coll, "--out", tmp_path / "r",
                    "--device", "cpu", "--cache-dir", tmp_path / "cache"], *world.trees, match="NaN or infinite",
            after_work=True)
    assert not (tmp_path / "r").exists()


def test_non_finite_query_vectors_are_refused(world, tmp_path, capfd):
    q = np.ones((2, 8), np.float32)
    q[1, 2] = np.nan
    np.save(tmp_path / "q.npy", q)
    refused(capfd, ["search", world.index, tmp_path / "q.npy"], *world.trees, match="NaN or infinite")


# -- bounds on every value, and wrong types ------------------------------------------------------

NUMBERS = {  # command (given world, tmp) -> {option: bad values}
    "data demo": (lambda w, t: ["data", "demo", t / "o"],
                  {"--seed": ["-1", str(2**64), "x"], "--scale": ["0", "-1", "nan", "inf", "1e9", "x"]}),
    "data pack": (lambda w, t: ["data", "pack", w.coll, t / "o"],
                  {"--max-side": ["0", "7", str(10**9), "x"], "--quality": ["0", "101", "1.5"],
                   "--workers": ["-1", str(10**6)]}),
    "model init": (lambda w, t: ["model", "init", "--backbone", "timm:test_resnet", "--out", t / "o"],
                   {"--dim": ["0", "-1", str(10**9), "x"], "--image-size": ["0", "-5", str(10**6)],
                    "--nested-dims": ["a,b", "0", "100000"], "--seed": ["-1", str(2**64)], "--crop-pct": ["nan", "0"]}),
    "embed": (lambda w, t: ["embed", "--model", w.model, "--data", w.coll, "--out", t / "o", "--device", "cpu"],
              {"--batch-size": ["0", "-1", str(10**9), "x"], "--workers": ["-1", str(10**6)]}),
    "index build": (lambda w, t: ["index", "build", w.store, "--out", t / "o"],
                    {"--recall-k": ["0", "-1", str(10**12)], "--target-recall": ["0", "1.5", "nan", "-1"],
                     "--max-memory": ["x", "-5G"], "--kind": ["IVF4096,Flat", "bogus"]}),
    "eval": (lambda w, t: ["eval", "--model", w.model, "--data", w.coll, "--out", t / "o", "--device", "cpu"],
             {"--k": ["0", "-1", str(10**9)], "--samples": ["-1", str(10**6)], "--batch-size": ["0"],
              "--workers": ["-1"]}),
    "search": (lambda w, t: ["search", w.index, "id:0"],
               {"--k": ["0", "-3", "x"], "--threshold": ["nan", "5", "-5"], "--shortlist-dim": ["0"]}),
    "dedup": (lambda w, t: ["dedup", w.index],
              {"--threshold": ["-5", "nan", "2"], "--fraction": ["0", "1", "nan"], "--neighbors": ["0", str(10**6)]}),
    "demo": (lambda w, t: ["demo", "--out", t / "o", "--device", "cpu"],
             {"--steps": ["1", "-1", str(10**12)], "--scale": ["0", "nan", "100"]}),
    "serve": (lambda w, t: ["serve", w.index],
              {"--port": ["-1", "70000"], "--max-batch": ["0"], "--max-wait-ms": ["-1", "nan"],
               "--max-upload-mb": ["0"]}),
}


@pytest.mark.parametrize("name", NUMBERS)
def test_out_of_range_and_wrong_type_numbers(world, name, tmp_path, capfd):
    command, options = NUMBERS[name]
    for option, values in options.items():
        for value in values:
            refused(capfd, [*command(world, tmp_path), option, value], *world.trees, tmp_path)
    assert not (tmp_path / "o").exists()


def test_ids_are_strictly_integers(world, tmp_path, capfd):
    index = copy_of(world.index, tmp_path)
    for text in ("2.7\n", "true\n", "1e3\n", "-1\n", f"{2**64}\n", "0x10\n"):
        (tmp_path / "ids.txt").write_text(text)
        refused(capfd, ["index", "remove", index, "--ids", tmp_path / "ids.txt"], *world.trees, index)
    (tmp_path / "ids.json").write_text("[1, 2.5]")
    refused(capfd, ["index", "remove", index, "--ids", tmp_path / "ids.json"], *world.trees, index)
    for query in ("id:2.7", "id:true", f"id:{2**64}", "id:-1", "id:99999"):
        refused(capfd, ["search", index, query], *world.trees, index)


def test_huge_class_ids_and_bad_records_are_refused(world, tmp_path, capfd):
    coll = copy_of(world.coll, tmp_path)
    for bad in ([{"path": "alpha/0_0.png", "class_id": 2**70}], [{"path": "alpha/0_0.png", "class_id": -1}],
                [{"path": "alpha/0_0.png", "class_id": True}], [{"path": "alpha/0_0.png", "class_id": []}],
                {"path": "x"}, [["alpha/0_0.png", 0]]):
        (coll / "info" / "alpha" / "train.json").write_text(json.dumps(bad))
        refused(capfd, ["data", "pack", coll, tmp_path / "p"], *world.trees, coll)
        refused(capfd, ["embed", "--model", world.model, "--data", coll, "--out", tmp_path / "s", "--split", "train"],
                *world.trees, coll)


# -- unknown names ---------------------------------------------------------------------------------

UNKNOWN = {
    "embed --domain": lambda w, t: ["embed", "--model", w.model, "--data", w.coll, "--out", t / "o", "--domain", "nope"],
    "embed --split": lambda w, t: ["embed", "--model", w.model, "--data", w.coll, "--out", t / "o", "--split", "nope"],
    "embed --device": lambda w, t: ["embed", "--model", w.model, "--data", w.coll, "--out", t / "o", "--device", "tpu"],
    "embed --dtype": lambda w, t: ["embed", "--model", w.model, "--data", w.coll, "--out", t / "o", "--dtype", "int8"],
    "model init backbone": lambda w, t: ["model", "init", "--backbone", "timm:resnet9000", "--out", t / "o"],
    "model init source": lambda w, t: ["model", "init", "--backbone", "hf:whatever", "--out", t / "o"],
    "model init pool": lambda w, t: ["model", "init", "--backbone", "timm:test_resnet", "--pool", "median",
                                     "--out", t / "o"],
    "data pack --image-format": lambda w, t: ["data", "pack", w.coll, t / "o", "--image-format", "gif"],
    "data check --info-dir": lambda w, t: ["data", "check", w.coll, "--info-dir", "nope"],
    "eval --split": lambda w, t: ["eval", "--model", w.model, "--data", w.coll, "--out", t / "o", "--split", "train"],
    "eval --protocol": lambda w, t: ["eval", "--model", w.model, "--data", w.coll, "--out", t / "o", "--protocol", "x"],
    "eval --rerank": lambda w, t: ["eval", "--model", w.model, "--data", w.coll, "--out", t / "o", "--rerank", "x"],
    "eval --model DOMAIN=": lambda w, t: ["eval", "--model", f"nope={w.model}", "--data", w.coll, "--out", t / "o"],
    "eval --index-kind": lambda w, t: ["eval", "--model", w.model, "--data", w.coll, "--out", t / "o",
                                       "--index-kind", "x"],
    "eval compare --metric": lambda w, t: ["eval", "compare", w.report, "--metric", "nope@3"],
    "index build --kind": lambda w, t: ["index", "build", w.store, "--out", t / "o", "--kind", "IVF-banana"],
    "index build --gpu": lambda w, t: ["index", "build", w.store, "--out", t / "o", "--gpu", "maybe"],
    "search --rerank": lambda w, t: ["search", w.index, "id:0", "--rerank", "x"],
    "search --domain": lambda w, t: ["search", w.index, "id:0", "--domain", "nope"],
    "search query": lambda w, t: ["search", w.index, t / "nothing.jpg"],
    "serve --device": lambda w, t: ["serve", w.index, "--device", "tpu"],
    "command": lambda w, t: ["frobnicate"],
    "option": lambda w, t: ["embed", "--modle", w.model],
}


@pytest.mark.parametrize("case", UNKNOWN)
def test_unknown_names(world, case, tmp_path, capfd):
    refused(capfd, UNKNOWN[case](world, tmp_path), *world.trees, tmp_path)
    assert not (tmp_path / "o").exists()


# -- index updates and versions ----------------------------------------------------------------------

def test_index_updates_of_a_wrong_path_create_nothing(world, tmp_path, capfd):
    (tmp_path / "ids.txt").write_text("0\n")
    for args in (["index", "add", tmp_path / "nope", world.store], ["index", "remove", tmp_path / "nope", "--ids",
                 tmp_path / "ids.txt"], ["index", "info", tmp_path / "nope"], ["search", tmp_path / "nope", "id:0"],
                 ["index", "add", world.store, world.store]):
        refused(capfd, args, *world.trees, match="not an index")
    assert not (tmp_path / "nope").exists()


def test_a_failed_build_leaves_no_index(world, tmp_path, capfd):
    refused(capfd, ["index", "build", world.store, "--out", tmp_path / "i", "--kind", "IVF4096,Flat"], *world.trees,
            match="lists|IVF|Faiss")
    assert not (tmp_path / "i").exists()


def test_index_add_of_another_models_store(world, tmp_path, capfd):
    assert main(["model", "init", "--backbone", "timm:test_resnet", "--out", str(tmp_path / "m2"), "--dim", "8",
                 "--image-size", "32", "--seed", "5"]) == 0
    assert main(["embed", "--model", str(tmp_path / "m2"), "--data", str(world.coll), "--out", str(tmp_path / "s2"),
                 "--workers", "0", "--device", "cpu", "--split", "val"]) == 0
    index = copy_of(world.index, tmp_path)
    capfd.readouterr()
    refused(capfd, ["index", "add", index, tmp_path / "s2"], *world.trees, index, match="model")


# -- Ctrl-C says whether re-running resumes ---------------------------------------------------------

@pytest.mark.parametrize("name,target,resumable", [
    ("data pack", "uniret.data.store._pack_images", True),
    ("embed", "uniret.embed.extract.embedded_batches", True),
    ("index build", "uniret.index.build._train", True),
    ("data demo", "uniret.data.demo._draw", False),
    ("model init", "uniret.embed.model.build_model", False),
])
def test_ctrl_c(world, name, target, resumable, tmp_path, capfd, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    args = writer_args(world, name, tmp_path / "o", tmp_path / "cache")
    capfd.readouterr()
    before = snapshot(*world.trees)
    assert main([str(a) for a in args]) == 130
    lines = one_line(capfd.readouterr().err)
    expected = "uniret: interrupted; re-run the same command to resume" if resumable else "uniret: interrupted"
    assert lines == [expected]
    assert snapshot(*world.trees) == before and not (tmp_path / "o").exists()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".o"))
    assert left == [], f"an interrupted {name} left {left}"  # scratch directories and locks are removed


# -- full disks, read-only disks and truncated LMDB files: in a subprocess, as a user sees them -----

DRIVER = r"""
import json, os, resource, shutil, signal, subprocess, sys, traceback
from uniret.cli import main

cases, mode = json.load(open(sys.argv[1])), sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # RLIMIT_FSIZE: writes fail with EFBIG instead
for case in cases:
    mnt = case["mnt"]
    os.makedirs(mnt, exist_ok=True)
    if mode == "tmpfs" and case.get("size"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + case["size"], "tmpfs", mnt], check=True)
        if case.get("ro"):
            subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    err = os.open(case["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(2)
    os.dup2(err, 2)
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    if mode == "fsize" and case.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], limits[1]))
    try:
        code = main(case["args"])
    except BaseException:
        code = "raised"
        traceback.print_exc()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        sys.stderr.flush()
        os.dup2(saved, 2)
        sys.stderr = sys.__stderr__
    left = sorted(os.listdir(mnt))
    if mode == "tmpfs" and case.get("size"):
        subprocess.run(["umount", mnt], check=True)
    print(json.dumps({"name": case["name"], "code": code, "left": left}), flush=True)
"""


def _namespace_prefix(tmp: Path) -> list[str] | None:
    """A way to mount a tiny tmpfs for one process tree (root, or user namespaces), else None."""
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = tmp / "probe"
        probe.mkdir(exist_ok=True)
        try:
            done = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {probe}"],
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return None


@pytest.fixture(scope="module")
def disk_cases(world, tmp_path_factory):
    """Run every full-disk, read-only and truncated-LMDB case in one subprocess (torch loads once)."""
    base = tmp_path_factory.mktemp("disks")
    prefix = _namespace_prefix(base)
    mode = "tmpfs" if prefix else "fsize"
    wide = base / "wide"  # a 512-d float32 store does not fit: the case where a memory map would SIGBUS
    assert main(["model", "init", "--backbone", "timm:test_resnet", "--out", str(wide), "--dim", "512",
                 "--image-size", "32"]) == 0
    trunc = copy_of(world.lmdb, base, "trunc.lmdb")
    truncate(trunc / "data.mdb", 0.5)
    meta_trunc = copy_of(world.index, base, "meta-trunc")
    truncate(meta_trunc / "v000001" / "meta" / "data.mdb", 0.4)
    cases = []

    def case(name, args, size=None, fsize=None, ro=False):
        mnt = base / name.replace(" ", "-")
        cases.append({"name": name, "mnt": str(mnt), "size": size, "fsize": fsize, "ro": ro,
                      "err": str(base / f"{name.replace(' ', '-')}.err"),
                      "args": [str(a).replace("MNT", str(mnt)) for a in args]})

    w = world
    full = [("data demo", ["data", "demo", "MNT/o", "--scale", "0.05"], "64k", 4096),
            ("data pack", ["data", "pack", w.coll, "MNT/o", "--max-side", "16"], "16k", 4096),
            ("model init", ["model", "init", "--backbone", "timm:test_resnet", "--out", "MNT/o", "--image-size", "32"],
             "64k", 8192),
            ("embed", ["embed", "--model", wide, "--data", w.coll, "--out", "MNT/o", "--dtype", "float32",
                       "--workers", "0", "--device", "cpu"], "48k", 4096),
            ("index build", ["index", "build", w.store, "--out", "MNT/o"], "12k", 1024),
            ("eval", ["eval", "--model", w.model, "--data", w.coll, "--out", "MNT/o", "--device", "cpu",
                      "--cache-dir", base / "cache"], "8k", 2048)]
    for name, args, size, fsize in full:
        case(f"full {name}", args, size=size, fsize=fsize)
        if mode == "tmpfs":
            case(f"read-only {name}", args, size="64k", ro=True)
    for name, args in [("data check", ["data", "check", trunc]),
                       ("embed", ["embed", "--model", w.model, "--data", trunc, "--out", "MNT/o", "--device", "cpu"]),
                       ("eval", ["eval", "--model", w.model, "--data", trunc, "--out", "MNT/o", "--device", "cpu"]),
                       ("search", ["search", meta_trunc, "id:0"])]:
        case(f"truncated lmdb {name}", args)
    (base / "cases.json").write_text(json.dumps(cases))
    (base / "driver.py").write_text(DRIVER)
    before = snapshot(*world.trees)
    done = subprocess.run([*(prefix or []), sys.executable, str(base / "driver.py"), str(base / "cases.json"), mode],
                          capture_output=True, text=True, timeout=900, env=_child_env())
    results = {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert snapshot(*world.trees) == before
    return SimpleNamespace(results=results, cases={c["name"]: c for c in cases}, mode=mode, done=done)


DISK_CASES = ([f"full {n}" for n in ("data demo", "data pack", "model init", "embed", "index build", "eval")]
              + [f"read-only {n}" for n in ("data demo", "data pack", "model init", "embed", "index build", "eval")]
              + [f"truncated lmdb {n}" for n in ("data check", "embed", "eval", "search")])


@pytest.mark.parametrize("name", DISK_CASES)
def test_full_read_only_and_truncated(disk_cases, name):
    if name.startswith("read-only") and disk_cases.mode != "tmpfs":
        pytest.skip("no mount namespace here for a read-only tmpfs")
    result = disk_cases.results.get(name)
    assert result is not None, (f"the driver died before {name!r} (a crash such as SIGBUS: exit "
                                f"{disk_cases.done.returncode}): {disk_cases.done.stderr[-3000:]}")
    err = Path(disk_cases.cases[name]["err"]).read_text()
    lines = one_line(err)
    if name == "full eval":  # the disk fills up only after the embedding was done and logged
        lines = [line for line in lines if line.startswith("error")]
    assert result["code"] in (1, 2), (result, err)
    assert "Traceback" not in err and len(lines) == 1, err
    if name.startswith("full"):
        assert re.search("no space|too large|free some space", lines[0], re.I), lines[0]
    if name.startswith("read-only"):
        assert "read-only" in lines[0], lines[0]
    if not name.startswith("truncated"):
        assert result["left"] == [], f"left on the full or read-only disk: {result['left']}"


def test_truncated_store_through_the_real_cli(disk_cases, world, tmp_path):
    done = subprocess_cli(["data", "check", Path(disk_cases.cases["truncated lmdb data check"]["args"][2])])
    assert_clean_failure(done, match="truncated")


# -- single output files: pages and JSON ------------------------------------------------------------

FILE_WRITERS = {
    "search --html": (lambda w, out: ["search", w.index, "id:0", "--html", out], ".html"),
    "dedup --html": (lambda w, out: ["dedup", w.index, "--html", out], ".html"),
    "dedup --out": (lambda w, out: ["dedup", w.index, "--out", out], ".json"),
}


@pytest.mark.parametrize("name", FILE_WRITERS)
def test_output_files_never_replace_what_uniret_did_not_make(world, name, tmp_path, capfd):
    command, suffix = FILE_WRITERS[name]
    foreign = tmp_path / f"notes{suffix}"
    foreign.write_text("mine\n")
    refused(capfd, command(world, foreign), *world.trees, tmp_path, match="never replaces")
    refused(capfd, command(world, world.index / f"x{suffix}"), *world.trees, match="inside")
    refused(capfd, command(world, tmp_path), *world.trees, tmp_path, match="directory|ending")
    refused(capfd, command(world, world.file / f"x{suffix}"), *world.trees, match="file")
    own = tmp_path / f"own{suffix}"
    assert main([str(a) for a in command(world, own)]) == 0 and own.is_file()
    refused(capfd, command(world, own), *world.trees, tmp_path, match="--overwrite")
    assert main([str(a) for a in [*command(world, own), "--overwrite"]]) == 0


# -- images that are not what they seem -----------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries almost no data (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_bombs_wide_and_float_images(world, tmp_path, capfd):
    from uniret.data.images import decode_image
    from uniret.errors import ImageDecodeError

    coll = copy_of(world.coll, tmp_path)
    (coll / "images" / "alpha" / "0_0.png").write_bytes(png_header_only(10_000, 10_000))  # Pillow would warn
    (coll / "images" / "alpha" / "0_1.png").write_bytes(png_header_only(20_000, 20_000))  # Pillow would raise
    capfd.readouterr()
    assert main(["data", "pack", str(coll), str(tmp_path / "p"), "--max-side", "16"]) == 0
    err = capfd.readouterr().err
    assert "DecompressionBomb" not in err and "Traceback" not in err, err
    assert err.count("decompression bomb") == 2, err
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    buf = tmp_path / "wide.png"
    Image.fromarray(ramp).save(buf)
    assert abs(np.asarray(decode_image(buf.read_bytes())).mean() - 127.5) < 1  # not clipped to white
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)).save(tmp_path / "f.tif")
    assert abs(np.asarray(decode_image((tmp_path / "f.tif").read_bytes())).mean() - 127.5) < 1  # not black
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(png_header_only(10_000, 10_000))


def test_two_packs_into_one_output(world, tmp_path, capfd):
    out = tmp_path / "p.lmdb"
    first = subprocess.Popen([sys.executable, "-m", "uniret.cli", "data", "pack", str(world.coll), str(out)],
                             env=_child_env({"UNIRET_TEST_SLEEP_PACK": "3", "UNIRET_TEST_PACK_COMMIT_EVERY": "4"}),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / ".p.lmdb.lock"
        for _ in range(600):  # wait until the first pack holds its lock (it sleeps after each commit)
            if (tmp_path / "p.lmdb.partial").is_dir():
                break
            import time

            time.sleep(0.1)
        assert lock.exists()
        refused(capfd, ["data", "pack", world.coll, out], *world.trees, match="another uniret command")
    finally:
        first.kill()
        first.wait()


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('huggingface.co', "
                                    "443), timeout=3)"], capture_output=True).returncode == 0,
                    reason="the hub is reachable from here: this is the offline case")
def test_pretrained_offline_is_one_line_and_quick(world, tmp_path, capfd):
    import time

    start = time.monotonic()
    refused(capfd, ["model", "init", "--backbone", "timm:resnet18", "--pretrained", "--out", tmp_path / "m"],
            *world.trees, match="no pretrained weights on this machine")
    assert time.monotonic() - start < 30  # the hub client retried for a minute before


# -- stale resume and caches -------------------------------------------------------------------------

def replace_image(coll: Path, rel: str = "alpha/4_0.png") -> None:
    """Draw another picture under the same name (another size and modification time)."""
    path = coll / "images" / rel
    Image.new("RGB", (20, 20), (250, 10, 10)).save(path)
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9, path.stat().st_mtime_ns + 10**9))


def test_changed_images_are_never_mixed_with_earlier_work(world, tmp_path, capfd, monkeypatch):
    coll = copy_of(world.coll, tmp_path)
    store, report = tmp_path / "store", tmp_path / "r1"
    cache = tmp_path / "cache"
    args = ["embed", "--model", world.model, "--data", coll, "--out", store, "--workers", "0", "--device", "cpu"]
    assert main([str(a) for a in args]) == 0
    ev = ["eval", "--model", world.model, "--data", coll, "--device", "cpu", "--cache-dir", cache, "--format", "json"]
    assert main([str(a) for a in [*ev, "--out", report]]) == 0
    replace_image(coll)
    capfd.readouterr()
    # a finished store of other images is not "nothing to do", and is replaced only with --overwrite
    refused(capfd, args, *world.trees, store, match="other images")
    assert main([str(a) for a in [*args, "--overwrite"]]) == 0
    # the evaluation cache is rebuilt: the report says the embeddings were not reused
    capfd.readouterr()
    assert main([str(a) for a in [*ev, "--out", tmp_path / "r2"]]) == 0
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["embeddings"]["reused"] is False


def test_an_interrupted_pack_starts_over_when_the_images_changed(world, tmp_path, capfd, monkeypatch):
    import lmdb

    from uniret import testing

    coll = copy_of(world.coll, tmp_path)
    out = tmp_path / "p.lmdb"
    calls = []

    def interrupt_after_first_commit(name):
        calls.append(name)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setenv("UNIRET_TEST_PACK_COMMIT_EVERY", "4")
    monkeypatch.setattr(testing, "sleep_point", interrupt_after_first_commit)
    assert main(["data", "pack", str(coll), str(out), "--image-format", "png"]) == 130
    assert (tmp_path / "p.lmdb.partial").is_dir()
    replace_image(coll, "alpha/0_0.png")  # the first image: packed before the interruption
    capfd.readouterr()
    assert main(["data", "pack", str(coll), str(out), "--image-format", "png"]) == 0
    assert "starting over" in capfd.readouterr().err
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        first = bytes(txn.get(b"img/alpha/train/00000000"))
    env.close()
    assert np.asarray(Image.open(io.BytesIO(first)))[0, 0].tolist() == [250, 10, 10]  # the new picture


def test_a_foreign_partial_directory_is_never_removed(world, tmp_path, capfd):
    partial = tmp_path / "s.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("not uniret's\n")
    refused(capfd, ["embed", "--model", world.model, "--data", world.coll, "--out", tmp_path / "s", "--device", "cpu",
                    "--workers", "0"], *world.trees, tmp_path, match="not made by uniret")
    refused(capfd, ["data", "pack", world.coll, tmp_path / "s"], *world.trees, tmp_path, match="not made by uniret")


def test_outputs_through_symlinks_and_caches_inside_inputs(world, tmp_path, capfd):
    (tmp_path / "link").symlink_to(world.coll)
    refused(capfd, ["embed", "--model", world.model, "--data", world.coll, "--out", tmp_path / "link"], *world.trees,
            match="inside|input")
    refused(capfd, ["eval", "--model", world.model, "--data", world.coll, "--out", tmp_path / "r",
                    "--cache-dir", world.coll / "cache"], *world.trees, match="--cache-dir")
    (tmp_path / "store-link").symlink_to(world.store)
    refused(capfd, ["index", "build", world.store, "--out", tmp_path / "store-link" / "idx"], *world.trees,
            match="input")


def test_newlines_in_names_stay_on_one_line(world, tmp_path, capfd):
    refused(capfd, ["embed", "--model", tmp_path / "a\nb", "--data", world.coll, "--out", tmp_path / "s"],
            *world.trees)


def test_settled_lmdb_passes_the_size_check(world, tmp_path):
    """LMDB may leave pages it allocated and freed in one transaction unwritten at the end of the file;
    writers extend the file to its header's size (the pages are free) so that readers' check holds."""
    from uniret.errors import UniretError
    from uniret.safeio import check_lmdb, settle_lmdb

    short = copy_of(world.lmdb, tmp_path)
    data = short / "data.mdb"
    os.truncate(data, data.stat().st_size - 4096)
    with pytest.raises(UniretError, match="truncated"):
        check_lmdb(short)
    settle_lmdb(short)
    check_lmdb(short)


def test_webdataset_patterns_and_shards(world, tmp_path, capfd):
    os.mkfifo(tmp_path / "s0.tar")
    refused(capfd, ["embed", "--model", world.model, "--data", tmp_path / "s{0..0}.tar", "--out", tmp_path / "o"],
            *world.trees, match="shard")  # a FIFO is not a shard: never opened
    refused(capfd, ["embed", "--model", world.model, "--data", tmp_path / "s{0..99999999999}.tar", "--out",
                    tmp_path / "o"], *world.trees, match="more than")  # not a list of 10^11 paths
    assert not (tmp_path / "o").exists()
