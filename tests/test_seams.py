"""The shared seams: one device resolver, one resumable partial directory, one store fingerprint,
one model-or-run-directory resolver and one test-seam module."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from uniret import testing
from uniret.cli import main
from uniret.data.collection import Item
from uniret.data.store import PackOptions, pack, pack_fingerprint
from uniret.embed.model import build_model, load_model, resolve_model_dir
from uniret.embed.store import EmbeddingStore, StoreWriter, open_finished, store_fingerprint, write_store
from uniret.errors import UniretError, UsageError
from uniret.utils import PartialDir, resolve_device

TINY = "timm:test_vit"


# -- resolve_device ----------------------------------------------------------------------------------

def test_resolve_device_spellings():
    assert resolve_device("cpu") == "cpu" and resolve_device(" CPU ") == "cpu"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert resolve_device(None) == resolve_device("auto") == ("cuda:0" if gpus else "cpu")
    for bad in ("bogus", "cuda:x", "gpu", "cuda:-1", ""):
        with pytest.raises(UsageError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if gpus:
        assert resolve_device("cuda", local_rank=gpus - 1) == f"cuda:{gpus - 1}"
        assert resolve_device(f"cuda:{gpus - 1}") == f"cuda:{gpus - 1}"
    else:
        with pytest.raises(UniretError, match="no CUDA device is visible"):
            resolve_device("cuda")
    with pytest.raises(UniretError, match="CUDA device"):
        resolve_device(f"cuda:{gpus}")  # one past the last device


@pytest.mark.parametrize("command", [["embed", "--model", "M", "--data", "D", "--out", "O"],
                                     ["eval", "--model", "M", "--data", "D", "--out", "O"]])
def test_bad_device_is_one_line(command, tmp_path, demo_root, capsys):
    model = tmp_path / "m"
    build_model(TINY, dim=8, image_size=32).save(model)
    args = [{"M": str(model), "D": str(demo_root), "O": str(tmp_path / "s")}.get(a, a) for a in command]
    code = main([*args, "--device", "bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "auto, cpu, cuda or cuda:N" in err[0], err


# -- PartialDir -------------------------------------------------------------------------------------

def test_partial_dir_resumes_same_fingerprint_and_restarts_another(tmp_path):
    out = tmp_path / "out"
    p = PartialDir(out, {"a": 1}, init=lambda d: (d / "init").write_text("x"))
    assert not p.resumed and p.path == tmp_path / "out.partial" and (p.path / "init").is_file()
    (p.path / "work").write_text("done so far")
    again = PartialDir(out, {"a": 1})
    assert again.resumed and (again.path / "work").read_text() == "done so far"
    other = PartialDir(out, {"a": 2})
    assert not other.resumed and not (other.path / "work").exists()
    restarted = PartialDir(out, {"a": 2}, restart=True)
    assert not restarted.resumed
    (restarted.path / "result").write_text("new")
    out.mkdir()
    (out / "old").write_text("previous")
    assert restarted.publish() == out
    assert sorted(f.name for f in out.iterdir()) == ["result"] and not restarted.path.exists()


def test_partial_dir_killed_during_init_starts_over(tmp_path):
    def dies(d):
        (d / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        PartialDir(tmp_path / "o", {"a": 1}, init=dies)
    p = PartialDir(tmp_path / "o", {"a": 1})  # no marker was written: not resumable
    assert not p.resumed and not (p.path / "half").exists()


# -- the store fingerprint ----------------------------------------------------------------------------

def _items(n: int, prefix: str = "x") -> list[Item]:
    return [Item(f"{prefix}{i}.png", "d", "test", i, (i % 3,)) for i in range(n)]


def test_store_fingerprint_covers_items_model_and_options():
    base = store_fingerprint(_items(5), 8, "float16", "m1", {"path": "/data"})
    assert base == store_fingerprint(_items(5), 8, "float16", "m1", {"path": "/data"})
    changed = [store_fingerprint(_items(5, "y"), 8, "float16", "m1", {"path": "/data"}),
               store_fingerprint(_items(6), 8, "float16", "m1", {"path": "/data"}),
               store_fingerprint(_items(5), 16, "float16", "m1", {"path": "/data"}),
               store_fingerprint(_items(5), 8, "float32", "m1", {"path": "/data"}),
               store_fingerprint(_items(5), 8, "float16", "m2", {"path": "/data"}),
               store_fingerprint(_items(5), 8, "float16", "m1", {"path": "/other"})]
    assert all(c != base for c in changed)


def test_store_writer_resumes_only_its_own_fingerprint(tmp_path):
    out, items = tmp_path / "s", _items(6)
    extra = {"model": {"config_hash": "m1"}, "source": {}}
    w = StoreWriter(out, items, 4, "float32", extra)
    w.write(np.arange(3), np.ones((3, 4), np.float32))
    w.checkpoint(np.arange(3))
    del w  # "killed" after three rows
    again = StoreWriter(out, items, 4, "float32", extra)
    assert again.done.tolist() == [True] * 3 + [False] * 3
    other = StoreWriter(out, _items(6, "y"), 4, "float32", extra)  # other images: start over
    assert not other.done.any() and not np.asarray(other.embeddings).any()
    other.write(np.arange(6), np.full((6, 4), 2, np.float32))
    other.checkpoint(np.arange(6))
    store = other.finish()
    assert store.fingerprint == store_fingerprint(_items(6, "y"), 4, "float32", "m1", {})
    assert open_finished(out, store.fingerprint) is not None
    assert open_finished(out, store_fingerprint(items, 4, "float32", "m1", {})) is None
    assert open_finished(tmp_path / "nope", store.fingerprint) is None


def test_eval_cache_rebuilt_when_fingerprint_differs(tmp_path, demo_root):
    """A cached store with the right model hash and count but other items is not reused."""
    from uniret.eval.run import evaluate

    model = tmp_path / "m"
    build_model(TINY, dim=8, image_size=32).save(model)
    cache = tmp_path / "cache"

    def run() -> dict:
        return evaluate(model, demo_root, cache_dir=cache, out=None)

    first = run()
    (store_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    store = EmbeddingStore(store_dir)
    tampered = [Item(it.path + ".other", it.domain, it.split, it.position, it.class_ids) for it in store.items]
    shutil.rmtree(store_dir)
    write_store(store_dir, np.zeros((store.count, store.dim), np.float32), tampered, model=store.manifest["model"],
                dtype="float16")
    second = run()
    assert second["embeddings"]["reused"] is False
    assert second["results"] == first["results"]  # re-embedded, not read from the zeros
    assert run()["embeddings"]["reused"] is True


def test_pack_restarts_a_partial_of_other_records(demo_root, tmp_path):
    root = tmp_path / "coll"
    shutil.copytree(demo_root, root)
    out = tmp_path / "s.lmdb"
    opts = PackOptions(max_side=32)
    from uniret.data.collection import FolderCollection

    src = FolderCollection(root)
    domains = {d: {s: len(src.records(d, s)) for s in src.splits(d)} for d in src.domains}
    stale = dict(pack_fingerprint(src, domains, opts), records="of another collection")
    leftover = PartialDir(out, stale)
    (leftover.path / "stale-file").write_text("x")
    pack(root, out, opts)
    assert not (out / "stale-file").exists() and not (out / PartialDir.MARKER).exists()
    assert (out / "data.mdb").is_file()


# -- resolve_model_dir --------------------------------------------------------------------------------

def test_model_dir_or_run_dir(tmp_path):
    model = tmp_path / "run" / "model"
    build_model(TINY, dim=8, image_size=32).save(model)
    assert resolve_model_dir(model) == model
    assert resolve_model_dir(tmp_path / "run") == model
    assert load_model(tmp_path / "run").config_hash() == load_model(model).config_hash()
    with pytest.raises(UniretError, match="no such model directory"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(UniretError, match="not a model directory"):
        resolve_model_dir(tmp_path)


def test_build_model_from_a_model_or_run_directory(tmp_path):
    """A trained model's backbone (weights and preprocessing) under a new head, through build_model."""
    torch.manual_seed(1)
    trained = build_model(TINY, dim=8, image_size=32)
    trained.save(tmp_path / "run" / "model")
    for source in (tmp_path / "run" / "model", tmp_path / "run"):
        fresh = build_model(str(source), dim=4)
        assert fresh.config.backbone == TINY and fresh.config.dim == 4
        assert fresh.config.preprocess == trained.config.preprocess
        for k, v in trained.backbone.state_dict().items():
            assert torch.equal(fresh.backbone.state_dict()[k], v), k
    with pytest.raises(UniretError, match="brings its own"):
        build_model(str(tmp_path / "run"), image_size=64)


def test_index_build_takes_a_run_directory(tmp_path):
    model = tmp_path / "run" / "model"
    m = build_model(TINY, dim=8, image_size=32)
    m.save(model)
    items = _items(40)
    vecs = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    write_store(tmp_path / "s", vecs, items, model={"config_hash": load_model(model).config_hash()})
    assert main(["index", "build", str(tmp_path / "s"), "--out", str(tmp_path / "idx"),
                 "--model", str(tmp_path / "run")]) == 0
    assert (tmp_path / "idx" / "model" / "config.json").is_file()


# -- the test seam ------------------------------------------------------------------------------------

def test_testing_hooks_are_inert_unless_set(monkeypatch):
    monkeypatch.delenv("UNIRET_TEST_PACK_COMMIT_EVERY", raising=False)
    assert testing.int_setting("pack_commit_every", 256) == 256
    monkeypatch.setenv("UNIRET_TEST_PACK_COMMIT_EVERY", "16")
    assert testing.int_setting("pack_commit_every", 256) == 16
    testing.sleep_point("nothing-set")  # returns at once
