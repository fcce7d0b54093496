"""Hostile inputs and outputs, round 3 (issue #21), through the real CLI.

Classes: every JSON or small file uniret reads (FIFOs, devices, directories, deep nesting, lone
surrogates, oversized files); Faiss files that do not match their manifest; outputs that know where
they came from (dedup results name their index and version; pages their kind; nothing is written
inside another uniret output; ``index add`` compares content); paths read from uniret files
(canonical record paths, plain names in version directories, file names that are not UTF-8);
terminal-safe tables and messages; no temporary file left on a full disk. Every refusal is one line
with exit 1 or 2 and leaves every input and earlier output byte-identical.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from test_hostile import _child_env, _namespace_prefix, copy_of, one_line, refused, snapshot, write_collection

from uniret.cli import main

DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny collection, a model, a store, an index and an evaluation report, made through the CLI."""
    base = tmp_path_factory.mktemp("hostile3")
    w = SimpleNamespace(base=base, coll=write_collection(base / "coll"), model=base / "model", store=base / "store",
                        index=base / "index", report=base / "report")
    assert main(["model", "init", "--backbone", "timm:test_resnet", "--out", w.model, "--dim", "8",
                 "--image-size", "32"]) == 0
    assert main(["embed", "--model", w.model, "--data", w.coll, "--out", w.store, "--workers", "0",
                 "--device", "cpu", "--batch-size", "16"]) == 0
    assert main(["index", "build", w.store, "--out", w.index, "--model", w.model]) == 0
    assert main(["eval", "--model", w.model, "--data", w.coll, "--out", w.report, "--device", "cpu",
                 "--k", "10", "--samples", "1", "--cache-dir", base / "cache"]) == 0
    w.trees = [w.coll, w.model, w.store, w.index, w.report]
    return w


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) if a command blocks, e.g. on a FIFO."""
    def hung(*_):
        raise AssertionError("the command hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def special(kind: str, path: Path) -> Path:
    """A FIFO, a directory, or a symbolic link to /dev/zero at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    return path


# -- one reader for JSON and small files ------------------------------------------------------------

TRAIN = ["--backbone", "timm:test_resnet", "--image-size", "32", "--steps", "1", "--batch-size", "4",
         "--device", "cpu", "--val-every", "0"]


@pytest.mark.parametrize("kind", ["fifo", "zero", "dir"])
def test_config_and_ids_that_are_not_regular_files(world, kind, tmp_path, capfd, alarm):
    cfg = special(kind, tmp_path / "cfg.json")
    refused(capfd, ["train", "--data", world.coll, "--out", tmp_path / "run", "--config", cfg, *TRAIN], *world.trees,
            match="FIFO|device|directory|regular file")
    assert not (tmp_path / "run").exists()
    index = copy_of(world.index, tmp_path)
    for suffix in (".json", ".txt"):
        ids = special(kind, tmp_path / f"ids{suffix}")
        refused(capfd, ["index", "remove", index, "--ids", ids], *world.trees, index,
                match="FIFO|device|directory|regular file|no such file")


def test_deeply_nested_json_in_every_file_is_one_line(world, tmp_path, capfd):
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    refused(capfd, ["train", "--data", world.coll, "--out", tmp_path / "run", "--config", deep, *TRAIN],
            *world.trees, match="nested deeper")
    refused(capfd, ["train", "--data", world.coll, "--out", tmp_path / "run", "--augment", DEEP, *TRAIN],
            *world.trees, match="--augment")
    index = copy_of(world.index, tmp_path)
    refused(capfd, ["index", "remove", index, "--ids", deep], *world.trees, index, match="nested deeper")
    coll = copy_of(world.coll, tmp_path / "checked")
    (coll / "info/alpha/test.json").write_text(DEEP)
    capfd.readouterr()
    assert main(["data", "check", coll]) == 1  # a report of problems: one line per problem, then a summary
    err = capfd.readouterr().err
    assert "alpha/test.json: JSON nested deeper" in err and "Traceback" not in err and len(one_line(err)) == 2
    cases = [  # (artefact, file replaced by deep JSON, command given the copy)
        ("coll", "info/beta/train.json", lambda c: ["embed", "--model", world.model, "--data", c, "--out",
                                                    tmp_path / "s", "--device", "cpu", "--workers", "0"]),
        ("model", "config.json", lambda c: ["model", "info", c]),
        ("store", "manifest.json", lambda c: ["index", "build", c, "--out", tmp_path / "i"]),
        ("index", "v000001/manifest.json", lambda c: ["search", c, "id:0"]),
        ("report", "metrics.json", lambda c: ["eval", "compare", c]),
    ]
    for artefact, rel, command in cases:
        copy = copy_of(getattr(world, artefact), tmp_path / artefact)
        (copy / rel).write_text(DEEP)
        line = refused(capfd, command(copy), *world.trees, copy, codes=(1,))
        assert "nested" in line and "internal error" not in line, line


def test_lone_surrogates_and_oversized_files(world, tmp_path, capfd):
    coll = copy_of(world.coll, tmp_path)
    records = json.loads((coll / "info" / "alpha" / "test.json").read_text())
    text = json.dumps(records + [{"path": "alpha/x.png", "class_id": 0, "note": "\udc80"}])
    (coll / "info" / "alpha" / "test.json").write_text(text)  # json.dumps writes the escape "\udc80"
    line = refused(capfd, ["embed", "--model", world.model, "--data", coll, "--out", tmp_path / "s",
                           "--device", "cpu", "--workers", "0"], *world.trees, coll)
    assert "surrogate" in line
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(2 << 20)  # a sparse 2 MB "config"
    refused(capfd, ["train", "--data", world.coll, "--out", tmp_path / "run", "--config", big, *TRAIN],
            *world.trees, match="MB limit")


def test_a_bad_webdataset_side_file_is_noted_and_the_sample_kept(tmp_path):
    from uniret.data.webdataset import list_shard

    shard = tmp_path / "00000.tar"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buf, format="JPEG")
    members = [("0.jpg", buf.getvalue()), ("0.json", DEEP.encode()), ("1.jpg", buf.getvalue()),
               ("1.json", b'{"a": "\\ud800"}'), ("2.jpg", buf.getvalue()), ("2.json", b'{"ok": 1}')]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    listing = list_shard(shard, "00000.tar")
    assert listing.keys == ["0", "1", "2"] and listing.extra == [{}, {}, {"ok": 1}]
    assert len(listing.notes) == 2 and "nested deeper" in listing.notes[0] and "surrogate" in listing.notes[1]


def test_faiss_files_are_checked_against_the_manifest(world, tmp_path, capfd):
    import faiss

    index = copy_of(world.index, tmp_path)
    other = faiss.IndexFlatIP(4)
    other.add(np.ones((3, 4), dtype=np.float32))
    faiss.write_index(other, str(index / "v000001" / "index.faiss"))
    for args in (["search", index, "id:0"], ["dedup", index], ["index", "add", index, world.store]):
        refused(capfd, args, *world.trees, index, match="dimension 4 with 3 vectors")
    index = copy_of(world.index, tmp_path, "fewer")
    fewer = faiss.read_index(str(index / "v000001" / "index.faiss"))
    fewer.remove_ids(faiss.IDSelectorRange(0, 5))
    faiss.write_index(fewer, str(index / "v000001" / "index.faiss"))
    refused(capfd, ["search", index, "id:7"], *world.trees, index, match="manifest says")
    index = copy_of(world.index, tmp_path, "fifo")
    (index / "v000001" / "index.faiss").unlink()
    os.mkfifo(index / "v000001" / "index.faiss")
    refused(capfd, ["search", index, "id:7"], *world.trees, index, match="not a regular file")


def test_names_in_version_manifests_are_plain_names(tmp_path):
    from uniret.errors import UniretError
    from uniret.index.layout import version_file

    version = tmp_path / "v000001"
    version.mkdir()
    (version / "lists.ivfdata").write_bytes(b"")
    (tmp_path / "elsewhere.ivfdata").write_bytes(b"x")
    assert version_file(version, "lists.ivfdata") == version / "lists.ivfdata"
    for name in ["../elsewhere.ivfdata", str(tmp_path / "elsewhere.ivfdata"), "a/b", "..", ".", "", None, 7,
                 "x\x00y", "link.ivfdata"]:
        if name == "link.ivfdata":
            (version / name).symlink_to(tmp_path / "elsewhere.ivfdata")
        with pytest.raises(UniretError, match="plain file name|not a regular file"):
            version_file(version, name)


# -- provenance -------------------------------------------------------------------------------------

def test_dedup_results_remove_only_from_their_index_and_version(world, tmp_path, capfd):
    a, b = copy_of(world.index, tmp_path, "a"), tmp_path / "b"
    assert main(["index", "build", world.store, "--out", b]) == 0  # the same items: ids mean the same rows
    dups = tmp_path / "dups.json"
    assert main(["dedup", a, "--threshold", "0.5", "--out", dups]) == 0
    made = json.loads(dups.read_text())
    assert made["index"]["version"] == "v000001" and made["remove"], made
    refused(capfd, ["index", "remove", b, "--ids", dups], *world.trees, a, b, dups, match="another index")
    # a hand-edited object without the index it came from
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({"format": "uniret-dedup/1", "remove": made["remove"]}))
    refused(capfd, ["index", "remove", a, "--ids", forged], *world.trees, a, b, match="which index")
    forged.write_text(json.dumps({"remove": made["remove"]}))
    refused(capfd, ["index", "remove", a, "--ids", forged], *world.trees, a, b, match="which index")
    forged.write_text(json.dumps(dict(made, index=dict(made["index"], id="0" * 32))))
    refused(capfd, ["index", "remove", a, "--ids", forged], *world.trees, a, b, match="another index")
    # a newer version of the same index: the result is stale
    c = copy_of(a, tmp_path, "c")
    plain = tmp_path / "one.txt"
    plain.write_text(f"{made['keep'][0]}\n")
    assert main(["index", "remove", c, "--ids", plain]) == 0
    refused(capfd, ["index", "remove", c, "--ids", dups], *world.trees, c, match="version v000001")
    # the right index and version: removed
    capfd.readouterr()
    assert main(["index", "remove", a, "--ids", dups, "--format", "json"]) == 0
    assert json.loads(capfd.readouterr().out)["rows"][0]["removed"] == len(made["remove"])


def test_no_command_writes_inside_another_output(world, tmp_path, capfd):
    index, report, store = (copy_of(getattr(world, n), tmp_path) for n in ("index", "report", "store"))
    trees = [*world.trees, index, report, store]
    cases = [
        ["model", "init", "--backbone", "timm:test_resnet", "--out", index / "model", "--overwrite", "--dim", "8"],
        ["search", world.index, "id:0", "--html", report / "report.html", "--overwrite"],
        ["dedup", world.index, "--html", report / "report.html", "--overwrite"],
        ["dedup", world.index, "--out", index / "dups.json"],
        ["eval", "--model", world.model, "--data", world.coll, "--out", store / "report", "--device", "cpu",
         "--cache-dir", tmp_path / "cache"],
        ["embed", "--model", world.model, "--data", world.coll, "--out", report / "store", "--device", "cpu"],
        ["index", "build", world.store, "--out", index / "v000001" / "nested"],
        ["train", "--data", world.coll, "--out", world.model / "run", *TRAIN],
    ]
    for args in cases:
        line = refused(capfd, args, *trees)
        assert re.search(r"inside the (index|evaluation report|embedding store|model directory)", line), line


def test_pages_replace_only_their_own_kind(world, tmp_path, capfd):
    search_page, dedup_page = tmp_path / "s.html", tmp_path / "d.html"
    assert main(["search", world.index, "id:0", "--html", search_page]) == 0
    assert main(["dedup", world.index, "--html", dedup_page]) == 0
    assert b'<meta name="uniret-page" content="search">' in search_page.read_bytes()
    refused(capfd, ["dedup", world.index, "--html", search_page, "--overwrite"], *world.trees, search_page,
            match="not a dedup page")
    refused(capfd, ["search", world.index, "id:0", "--html", dedup_page, "--overwrite"], *world.trees, dedup_page,
            match="not a search page")
    shutil.copy(world.report / "report.html", tmp_path / "r.html")
    refused(capfd, ["search", world.index, "id:0", "--html", tmp_path / "r.html", "--overwrite"], *world.trees,
            tmp_path / "r.html", match="not a search page")
    old = tmp_path / "old.html"  # a page of an earlier uniret: no kind recorded
    old.write_text('<!DOCTYPE html><html><head><meta name="generator" content="uniret"></head></html>')
    refused(capfd, ["search", world.index, "id:0", "--html", old, "--overwrite"], *world.trees, old)
    assert main(["search", world.index, "id:1", "--html", search_page, "--overwrite"]) == 0


def test_index_add_compares_content_at_indexed_paths(world, tmp_path, capfd):
    coll = copy_of(world.coll, tmp_path)
    changed = ["alpha/0_0.png", "beta/1_1.png", "alpha/3_0.png"]
    for rel in changed:
        Image.new("RGB", (16, 16), (250, 5, 120)).save(coll / "images" / rel)
    store2 = tmp_path / "store2"
    assert main(["embed", "--model", world.model, "--data", coll, "--out", store2, "--workers", "0",
                 "--device", "cpu"]) == 0
    index = copy_of(world.index, tmp_path)
    line = refused(capfd, ["index", "add", index, store2], *world.trees, index, store2)
    assert "3 item(s)" in line and "--replace" in line and "alpha/0_0.png" in line
    capfd.readouterr()
    assert main(["index", "add", index, store2, "--replace", "--format", "json"]) == 0
    res = json.loads(capfd.readouterr().out)["rows"][0]
    assert res["replaced"] == 3 and res["added"] == 0 and res["count"] == json.loads(
        (world.index / "v000001" / "manifest.json").read_text())["count"]
    from uniret.index.searcher import Searcher

    s = Searcher.open(index)
    new_ids = s.ids[-3:]
    assert sorted(m["path"] for m in s.metadata(new_ids)) == sorted(changed)
    # the same store again: nothing changed any more, nothing added
    capfd.readouterr()
    assert main(["index", "add", index, store2, "--format", "json"]) == 0
    assert json.loads(capfd.readouterr().out)["rows"][0]["added"] == 0


# -- paths read from uniret files -----------------------------------------------------------------------

def test_record_paths_are_canonical_and_duplicates_found(world, tmp_path, capfd):
    coll = copy_of(world.coll, tmp_path)
    split = coll / "info" / "alpha" / "test.json"
    records = json.loads(split.read_text())
    rel = records[0]["path"]
    folder, name = rel.split("/")
    records += [{"path": f"{folder}/./{name}", "class_id": 0}, {"path": f"{folder}//{name}", "class_id": 0},
                {"path": f"./{folder}/{name}", "class_id": 0}]
    split.write_text(json.dumps(records))
    capfd.readouterr()
    assert main(["data", "check", coll]) == 1
    err = capfd.readouterr().err
    assert "1 duplicate paths" in err and "canonical" in err and "Traceback" not in err
    from uniret.data.collection import DuplicatePaths, canonical_path, load_split_file

    with pytest.raises(DuplicatePaths) as caught:
        load_split_file(split)
    assert [r.path for r in caught.value.records][-3:] == [rel] * 3
    # embedding, packing or evaluating it would count one image twice: refused
    for args in (["embed", "--model", world.model, "--data", coll, "--out", tmp_path / "s", "--device", "cpu",
                  "--workers", "0"], ["data", "pack", coll, tmp_path / "p.lmdb", "--max-side", "16"],
                 ["eval", "--model", world.model, "--data", coll, "--out", tmp_path / "r", "--device", "cpu"]):
        refused(capfd, args, *world.trees, coll, match="1 duplicate paths")
    assert canonical_path("a\\b/./c//d") == "a/b/c/d" and canonical_path("../x") == "../x"
    assert canonical_path("/abs/./x") == "/abs/x"


def test_file_names_that_are_not_utf8_are_skipped_and_listed(world, tmp_path, capfd):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in (b"good.png", b"bad\xff\xfe.png", b"esc\x1b[2J.png"):
        Image.new("RGB", (16, 16), (1, 2, 3)).save(os.fsdecode(bytes(folder).__add__(b"/" + name)))
    capfd.readouterr()
    assert main(["embed", "--model", world.model, "--data", folder, "--out", tmp_path / "s", "--workers", "0",
                 "--device", "cpu"]) == 0
    err = capfd.readouterr().err
    assert "1 image file(s) whose names are not UTF-8 skipped" in err and "bad\\xff\\xfe.png" in err
    assert "\x1b" not in err
    # a domain folder so named: data check and pack go on without it
    coll = copy_of(world.coll, tmp_path)
    os.rename(coll / "info" / "beta", os.fsdecode(bytes(coll / "info") + b"/b\xe9ta"))
    assert main(["data", "check", coll]) == 0
    err = capfd.readouterr().err
    assert "not UTF-8 skipped" in err and "Traceback" not in err
    assert main(["data", "pack", coll, tmp_path / "p.lmdb", "--max-side", "16"]) == 0


# -- terminal-safe output ------------------------------------------------------------------------------

HOSTILE_NAME = "a\x1b]0;owned\x07\x1b[2J\nforged  row\u202e\x9b.png"


def test_tables_and_messages_are_terminal_safe(world, tmp_path, capfd):
    coll = tmp_path / "coll"
    shutil.copytree(world.coll, coll)
    records = json.loads((coll / "info" / "alpha" / "test.json").read_text())
    os.rename(coll / "images" / records[0]["path"], coll / "images" / HOSTILE_NAME)
    records[0]["path"] = HOSTILE_NAME
    (coll / "info" / "alpha" / "test.json").write_text(json.dumps(records))
    assert main(["embed", "--model", world.model, "--data", coll, "--out", tmp_path / "s", "--workers", "0",
                 "--device", "cpu", "--split", "test"]) == 0
    assert main(["index", "build", tmp_path / "s", "--out", tmp_path / "i"]) == 0
    capfd.readouterr()
    for args in (["search", tmp_path / "i", "id:0", "--k", "3"], ["dedup", tmp_path / "i", "--threshold", "0.01"],
                 ["index", "info", tmp_path / "i"], ["data", "check", coll]):
        main(args)
        out, err = capfd.readouterr()
        for text in (out, err):
            assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", text), (args, text)
        if args[0] == "search":
            lines = out.strip().splitlines()
            assert len(lines) == 2 + 3 and "\\x1b]0;owned\\x07\\x1b[2J\\nforged" in out, out
    capfd.readouterr()
    assert main(["search", tmp_path / "i", "id:0", "--k", "1", "--format", "json"]) == 0
    assert json.loads(capfd.readouterr().out)["rows"][0]["path"] == HOSTILE_NAME  # JSON keeps the real name
    # an error line naming such a path
    refused(capfd, ["index", "info", tmp_path / HOSTILE_NAME], *world.trees, match=r"\\x1b\]0;owned")


def test_undecodable_names_never_reach_stdout_as_invalid_utf8(world, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "fine.png")
    assert main(["embed", "--model", world.model, "--data", folder, "--out", tmp_path / "s", "--workers", "0",
                 "--device", "cpu"]) == 0
    assert main(["index", "build", tmp_path / "s", "--out", tmp_path / "i"]) == 0
    bad_dir = os.fsdecode(bytes(tmp_path) + b"/\xff\xfeidx")
    shutil.copytree(tmp_path / "i", bad_dir)
    done = subprocess.run([sys.executable, "-m", "uniret.cli", "index", "info", bad_dir], capture_output=True,
                          env=_child_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    done.stdout.decode("utf-8")  # strict: no invalid UTF-8 written
    assert b"\\xff\\xfeidx" in done.stdout


# -- temporary files on a full disk -----------------------------------------------------------------------

DRIVER = r"""
import json, os, resource, signal, subprocess, sys, traceback
from uniret.cli import main

cases, mode = json.load(open(sys.argv[1])), sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
for case in cases:
    mnt = case["mnt"]
    os.makedirs(mnt, exist_ok=True)
    if mode == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + case["size"], "tmpfs", mnt], check=True)
        if case["fill"]:  # a disk with no byte left: every write fails at once
            fd = os.open(os.path.join(mnt, ".filler"), os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"x" * 512):
                    pass
            except OSError:
                pass
            os.close(fd)
    err = os.open(case["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(2)
    os.dup2(err, 2)
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    if mode == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 if case["fill"] else case["fsize"], limits[1]))
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
    left = sorted(os.path.relpath(os.path.join(d, f), mnt) for d, _, files in os.walk(mnt) for f in files
                  if f != ".filler")
    empty = [p for p in left if os.path.getsize(os.path.join(mnt, p)) == 0]
    if mode == "tmpfs":
        subprocess.run(["umount", mnt], check=True)
    print(json.dumps({"name": case["name"], "code": code, "left": left, "empty": empty}), flush=True)
"""


@pytest.fixture(scope="module")
def full_disk(world, tmp_path_factory):
    base = tmp_path_factory.mktemp("full3")
    prefix = _namespace_prefix(base)
    mode = "tmpfs" if prefix else "fsize"
    parts = []
    for k in (0, 1):
        parts.append(base / f"part{k}")
        assert main(["embed", "--model", world.model, "--data", world.coll, "--out", parts[-1], "--part", f"{k}/2",
                     "--workers", "0", "--device", "cpu"]) == 0
    w, cases = world, []

    def case(name, args, size, fsize, fill=False):
        mnt = base / name.replace(" ", "-")
        cases.append({"name": name, "mnt": str(mnt), "size": size, "fsize": fsize, "fill": fill,
                      "err": str(base / f"{mnt.name}.err"),
                      "args": [str(a).replace("MNT", str(mnt)) for a in args]})

    case("search --html", ["search", w.index, "id:0", "--html", "MNT/s.html"], "64k", 0, fill=True)
    case("dedup --html", ["dedup", w.index, "--threshold", "0.01", "--html", "MNT/d.html"], "4k", 512)
    case("dedup --out", ["dedup", w.index, "--threshold", "0.01", "--out", "MNT/d.json"], "64k", 0, fill=True)
    case("store merge --copy", ["store", "merge", *parts, "--out", "MNT/m", "--copy"], "8k", 1024)
    case("train", ["train", "--data", w.coll, "--out", "MNT/run", *TRAIN], "8k", 512)
    case("demo", ["demo", "--out", "MNT/d", "--steps", "2", "--scale", "0.05", "--device", "cpu"], "64k", 4096)
    (base / "cases.json").write_text(json.dumps(cases))
    (base / "driver.py").write_text(DRIVER)
    before = snapshot(*world.trees, *parts)
    done = subprocess.run([*(prefix or []), sys.executable, str(base / "driver.py"), str(base / "cases.json"), mode],
                          capture_output=True, text=True, timeout=600, env=_child_env())
    results = {r["name"]: r for r in map(json.loads, (line for line in done.stdout.splitlines()
                                                      if line.startswith('{"name"')))}
    assert snapshot(*world.trees, *parts) == before
    return SimpleNamespace(results=results, cases={c["name"]: c for c in cases}, done=done)


@pytest.mark.parametrize("name", ["search --html", "dedup --html", "dedup --out", "store merge --copy", "train",
                                  "demo"])
def test_a_full_disk_leaves_no_temporary_files(full_disk, name):
    result = full_disk.results.get(name)
    assert result is not None, full_disk.done.stderr[-3000:]
    err = Path(full_disk.cases[name]["err"]).read_text()
    lines = [line for line in one_line(err) if line.startswith("error")]
    assert result["code"] in (1, 2), (result, err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert re.search("no space|too large|free some space|cannot write", lines[0], re.I), lines[0]
    assert not [p for p in result["left"] if ".tmp" in p or ".partial" in p], result["left"]
    assert result["empty"] == [], f"0-byte files left: {result['empty']}"
