"""The collection format, validation, the LMDB store (round trip, corrupt images, resume after a
kill, reads from DataLoader workers), the demo data and the CLI's error path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from uniret.cli import main
from uniret.data import open_collection, open_items
from uniret.data.demo import make_demo
from uniret.data.images import decode_image
from uniret.data.store import LmdbCollection, PackOptions, pack
from uniret.data.validate import check_collection
from uniret.errors import ImageDecodeError, UniretError


def _write_split(root: Path, domain: str, split: str, records) -> None:
    p = root / "info" / domain / f"{split}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(records))


def _copy(demo_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "coll"
    shutil.copytree(demo_root, dst)
    return dst


def _lmdb_contents(path: Path) -> dict:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {bytes(k): bytes(v) for k, v in txn.cursor()}
    env.close()
    meta = json.loads(out.pop(b"meta"))
    meta.pop("source")
    return {"meta": meta, **out}


# -- the collection API ---------------------------------------------------------------------------

def test_demo_is_deterministic_and_uned_shaped(tmp_path):
    a = make_demo(tmp_path / "a", seed=3, scale=0.2)
    b = make_demo(tmp_path / "b", seed=3, scale=0.2)
    assert a == b
    for f in sorted((tmp_path / "a" / "images").rglob("*.png"))[:20]:
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    coll = open_collection(tmp_path / "a")
    assert coll.domains == ["flags", "glyphs", "shapes", "textures"]
    for d in coll.domains:
        train = {c for r in coll.records(d, "train") for c in r.class_ids}
        assert sorted(train) == list(range(len(train)))  # contiguous from 0
        evals = {c for s in coll.splits(d) if s != "train" for r in coll.records(d, s) for c in r.class_ids}
        assert not train & evals  # class-disjoint
    assert coll.query_index_splits("shapes", "test") == ("test", "index")
    assert coll.query_index_splits("glyphs", "test") == ("test", "test")
    assert coll.query_index_splits("shapes", "val") == ("val", "val")
    assert check_collection(tmp_path / "a").ok


def test_items_and_bytes(demo_root):
    items = open_items(demo_root, domains=["flags"], splits=["test", "index"])
    assert {i.split for i in items} == {"test", "index"}
    assert all(i.domain == "flags" for i in items)
    img = decode_image(items.get_image_bytes(0))
    assert img.mode == "RGB" and img.size == (64, 64)
    with pytest.raises(UniretError, match="unknown domain"):
        open_items(demo_root, domains=["nope"])
    folder = open_items(demo_root / "images" / "flags")
    assert len(folder) == sum(1 for _ in (demo_root / "images" / "flags").rglob("*.png"))
    assert folder[0].domain is None and folder.get_image_bytes(0)[:4] == b"\x89PNG"


def test_uned_layout_options(demo_root, tmp_path):
    """The original UnED download: info_files/ and an image root elsewhere."""
    root = tmp_path / "uned"
    shutil.copytree(demo_root / "info", root / "info_files")
    coll = open_collection(root, info_dir="info_files", image_root=demo_root / "images")
    assert coll.records("flags", "train") == open_collection(demo_root).records("flags", "train")
    assert coll.get_image_bytes("flags", "train", 0)[:4] == b"\x89PNG"
    with pytest.raises(UniretError, match="--info-dir"):
        open_collection(root)


# -- validation ------------------------------------------------------------------------------------

def test_check_reports_each_problem(demo_root, tmp_path):
    root = _copy(demo_root, tmp_path)
    (root / "info" / "flags" / "val.json").unlink()  # missing split file
    recs = json.loads((root / "info" / "glyphs" / "train.json").read_text())
    recs[1]["class_id"] = -4  # bad class id
    _write_split(root, "glyphs", "train", recs)
    recs = json.loads((root / "info" / "shapes" / "test.json").read_text())
    recs[0]["path"] = "shapes/none/missing.png"  # missing image
    recs.append(dict(recs[1]))  # duplicate path
    _write_split(root, "shapes", "test", recs)
    _write_split(root, "textures", "val", [{"path": "x.png"}])  # no class_id
    res = check_collection(root)
    assert not res.ok
    text = "\n".join(res.errors)
    assert "flags/val.json: split file missing" in text
    assert "glyphs/train.json: bad records: #1" in text and "-4" in text
    assert "shapes/test.json: 1 image files do not exist" in text and "missing.png" in text
    assert "shapes/test.json: 1 duplicate paths" in text
    assert "textures/val.json: bad records: #0 has no path or class_id" in text
    assert all("\n" not in e for e in res.errors)


def test_check_warnings(tmp_path):
    root = tmp_path / "c"
    for i in range(4):
        (root / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(__file__), root / "images" / f"{i}.png")  # existence is all check needs
    _write_split(root, "d", "train", [{"path": "0.png", "class_id": 0}, {"path": "1.png", "class_id": 2}])
    _write_split(root, "d", "val", [{"path": "2.png", "class_id": 5}, {"path": "3.png", "class_id": 5}])
    _write_split(root, "d", "test", [{"path": "2.png", "class_id": 7}, {"path": "3.png", "class_id": [8, 9]}])
    res = check_collection(root)
    assert res.ok, res.errors
    joined = "\n".join(res.warnings)
    assert "not contiguous from 0" in joined
    assert "test.json: 2 queries have no relevant test image" in joined
    assert "val.json" not in joined


def test_check_cli_exit_codes(demo_root, tmp_path, capsys):
    assert main(["data", "check", str(demo_root)]) == 0
    out = capsys.readouterr().out
    assert "flags" in out and "index" in out
    root = _copy(demo_root, tmp_path)
    (root / "info" / "flags" / "val.json").unlink()
    assert main(["data", "check", str(root), "--format", "json"]) == 1
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["ok"] is False and any("val.json" in e for e in payload["errors"])
    assert "Traceback" not in captured.err


# -- the LMDB store --------------------------------------------------------------------------------

def test_pack_round_trip(demo_root, demo_lmdb):
    folder, packed = open_collection(demo_root), open_collection(demo_lmdb)
    assert isinstance(packed, LmdbCollection)
    assert packed.domains == folder.domains
    for d in folder.domains:
        assert packed.splits(d) == folder.splits(d)
        for s in folder.splits(d):
            assert packed.records(d, s) == folder.records(d, s)
    a = decode_image(folder.get_image_bytes("shapes", "train", 3))
    b = decode_image(packed.get_image_bytes("shapes", "train", 3))
    assert a.size == b.size
    assert check_collection(demo_lmdb).ok
    items = open_items(demo_lmdb, domains=["glyphs"], splits=["test"])
    assert [i.path for i in items] == [r.path for r in folder.records("glyphs", "test")]


def test_pack_resizes_keeping_aspect(tmp_path):
    from PIL import Image

    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (400, 100), (10, 200, 30)).save(root / "images" / "wide.png")
    Image.new("RGB", (20, 30), (10, 200, 30)).save(root / "images" / "small.png")
    for s in ("train", "val", "test"):
        _write_split(root, "d", s, [{"path": "wide.png", "class_id": 0}, {"path": "small.png", "class_id": 0}])
    pack(root, tmp_path / "s.lmdb", PackOptions(max_side=100))
    packed = open_collection(tmp_path / "s.lmdb")
    assert decode_image(packed.get_image_bytes("d", "train", 0)).size == (100, 25)
    assert decode_image(packed.get_image_bytes("d", "train", 1)).size == (20, 30)  # never enlarged


def test_pack_skips_corrupt_images(demo_root, tmp_path, capsys):
    root = _copy(demo_root, tmp_path)
    rec = open_collection(root).records("flags", "train")
    (root / "images" / rec[2].path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # corrupt
    truncated = root / "images" / rec[5].path
    truncated.write_bytes(truncated.read_bytes()[:200])  # truncated
    out = tmp_path / "s.lmdb"
    assert main(["data", "pack", str(root), str(out), "--max-side", "64"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image(s)" in err and rec[2].path in err and rec[5].path in err
    packed = open_collection(out)
    assert [s["position"] for s in packed.skipped] == [2, 5]
    assert packed.records("flags", "train") == rec  # positions stay stable
    with pytest.raises(ImageDecodeError):
        packed.get_image_bytes("flags", "train", 2)
    decode_image(packed.get_image_bytes("flags", "train", 3))


def test_pack_resumes_after_kill(tmp_path):
    """Kill a real `uniret data pack` mid-way; the re-run completes to the same store."""
    root = tmp_path / "demo"
    make_demo(root, seed=1, scale=0.3)
    ref = tmp_path / "ref.lmdb"
    pack(root, ref, PackOptions(max_side=48))
    out = tmp_path / "killed.lmdb"
    env = dict(os.environ, UNIRET_TEST_SLEEP_PACK="0.2", UNIRET_TEST_PACK_COMMIT_EVERY="16")
    proc = subprocess.Popen([sys.executable, "-m", "uniret.cli", "data", "pack", str(root), str(out),
                             "--max-side", "48"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out.with_name(out.name + ".partial")
    deadline = time.time() + 60
    committed = 0
    while time.time() < deadline and committed < 3:
        time.sleep(0.1)
        if (partial / "data.mdb").exists():
            e = lmdb.open(str(partial), readonly=True, lock=False)
            committed = sum(1 for k, _ in e.begin().cursor() if k.startswith(b"img/")) // 16
            e.close()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed >= 3, proc.stderr.read().decode()
    assert not out.exists() and partial.exists()  # never half-written under the final name
    assert main(["data", "pack", str(root), str(out), "--max-side", "48"]) == 0
    assert not partial.exists()
    assert _lmdb_contents(out) == _lmdb_contents(ref)
    assert main(["data", "pack", str(root), str(out)]) == 1  # exists: refuses without --force


def test_pack_never_replaces_what_it_did_not_make(demo_root, tmp_path, capsys):
    root = _copy(demo_root, tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for out in (foreign, root, root / "images", tmp_path):
        assert main(["data", "pack", str(root), str(out), "--force"]) == 1, out
    assert (foreign / "keep.txt").read_text() == "mine" and (root / "info").is_dir()
    store = tmp_path / "s.lmdb"
    assert main(["data", "pack", str(root), str(store), "--max-side", "32"]) == 0
    assert main(["data", "pack", str(root), str(store), "--max-side", "48", "--force"]) == 0
    assert max(decode_image(open_collection(store).get_image_bytes("flags", "train", 0)).size) == 48
    assert not store.with_name("s.lmdb.partial").exists()


def _read_all(dataset, workers: int, ctx: str | None):
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=7, num_workers=workers,
                                         multiprocessing_context=ctx, collate_fn=list)
    return [x for batch in loader for x in batch]


class _BytesDataset:
    """Minimal map-style dataset: (index, pid, byte length) of each image."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return i, os.getpid(), len(self.items.get_image_bytes(i))


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_lmdb_reads_from_dataloader_workers(demo_lmdb, ctx):
    items = open_items(demo_lmdb)
    items.get_image_bytes(0)  # open the environment in the parent first: workers must reopen it
    ds = _BytesDataset(items)
    got = _read_all(ds, workers=2, ctx=ctx)
    assert [g[0] for g in got] == list(range(len(items)))
    assert len({g[1] for g in got}) == 2 and os.getpid() not in {g[1] for g in got}
    assert [g[2] for g in got] == [len(items.get_image_bytes(i)) for i in range(len(items))]


# -- the CLI and the package ----------------------------------------------------------------------

def test_cli_errors_are_one_line(tmp_path):
    for args in (["data", "check", str(tmp_path / "nope")], ["data", "pack", str(tmp_path), str(tmp_path / "o")]):
        r = subprocess.run([sys.executable, "-m", "uniret.cli", *args], capture_output=True, text=True)
        assert r.returncode == 1
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "uniret.cli", "data", "check", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=dict(os.environ, UNIRET_DEBUG="1"))
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "uniret.cli", "data", "pack", "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_no_top_level_modules_installed():
    """Only `uniret` lands in site-packages: no top-level embed/index/train/eval/data."""
    import importlib.metadata as md
    import importlib.util

    for name in ("embed", "index", "train", "eval", "data", "cli"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "site-packages" not in str(spec.origin), spec
    dist = md.distribution("uniret")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert top_level.split() == ["uniret"]
    editable = json.loads(dist.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable", False)
    in_site = "site-packages" in str(dist.locate_file(""))
    if in_site and not editable:  # a real install (CI): every file of ours lies under uniret/
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        assert tops <= {"uniret", f"uniret-{dist.version}.dist-info"}, tops


def test_library_imports_without_train():
    # The CLI lists train's choices from the method and sampler registries (torch-free modules);
    # nothing else of training loads, and neither does torch.
    light = {"uniret.train.commands", "uniret.train.methods", "uniret.train.samplers"}
    code = ("import sys, uniret.data, uniret.embed, uniret.index, uniret.eval, uniret.cli; "
            f"print(sorted(m for m in sys.modules if m.startswith('uniret.train.') and m not in {light!r}), "
            "'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] False"
