"""Extraction: id alignment through workers, resume after a kill, corrupt images, the manifest's
model check, several ranks, and the `uniret embed` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from uniret.cli import main
from uniret.data import open_items
from uniret.data.images import decode_image
from uniret.embed.extract import embed_items
from uniret.embed.model import build_model, load_model
from uniret.embed.store import EmbeddingStore
from uniret.errors import UniretError

TINY = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "m"
    build_model(TINY, dim=16, image_size=32).save(out)
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


def direct_embeddings(model, items) -> np.ndarray:
    """The reference: each image decoded and encoded on its own, no loader."""
    images = [decode_image(items.get_image_bytes(i)) for i in range(len(items))]
    return model.encode(images).numpy()


def test_rows_align_with_ids_across_workers_and_uneven_batches(model, demo_root, tmp_path):
    items = open_items(demo_root, domains=["glyphs", "flags"], splits=["test"])
    assert len(items) % 7 != 0  # the last batch is short
    store = embed_items(model, items, tmp_path / "s", batch_size=7, workers=2, dtype="float32")
    assert store.count == len(items) and store.dim == 16 and store.model_hash == model.config_hash()
    assert [it.to_json() for it in store.items] == [it.to_json() for it in items]
    np.testing.assert_allclose(store.embeddings, direct_embeddings(model, items), atol=1e-5)
    assert not (tmp_path / "s.partial").exists()


def test_resume_after_kill_embeds_only_missing_rows(model, demo_root, tmp_path, monkeypatch):
    items = open_items(demo_root, domains=["shapes"], splits=["test", "index"])
    out = tmp_path / "s"
    calls = {"n": 0, "rows": 0}
    real_forward = type(model).forward

    def dying_forward(self, x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the process is killed during its 4th batch
        return real_forward(self, x)

    monkeypatch.setattr(type(model), "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        embed_items(model, items, out, batch_size=5, workers=0, dtype="float32", checkpoint_every=1)
    assert not out.exists() and (tmp_path / "s.partial").is_dir()

    def counting_forward(self, x):
        calls["rows"] += len(x)
        return real_forward(self, x)

    monkeypatch.setattr(type(model), "forward", counting_forward)
    store = embed_items(model, items, out, batch_size=5, workers=0, dtype="float32", checkpoint_every=1)
    assert calls["rows"] == len(items) - 15  # three batches of 5 were checkpointed before the kill
    np.testing.assert_allclose(store.embeddings, direct_embeddings(model, items), atol=1e-5)
    # A finished store with the same model and source is not embedded again.
    calls["rows"] = 0
    embed_items(model, items, out, batch_size=5, workers=0, dtype="float32")
    assert calls["rows"] == 0


def test_corrupt_and_missing_images_are_skipped_and_reported(model, demo_root, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((demo_root / "images").rglob("*.png"))[:5]
    for i, src in enumerate(sources):
        shutil.copy(src, folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    items = open_items(folder)
    assert [it.path for it in items] == [f"{i}.png" for i in range(5)]
    with caplog.at_level("WARNING", logger="uniret"):
        assert main(["embed", "--model", str(_model_dir(model, tmp_path)),
                     "--data", str(folder), "--out", str(tmp_path / "s"), "--workers", "1",
                     "--batch-size", "2", "--dtype", "float32"]) == 0
    store = EmbeddingStore(tmp_path / "s")
    assert store.failed_ids.tolist() == [2] and "cannot decode" in store.failed["2"]
    assert not store.embeddings[2].any() and store.valid_mask.tolist() == [True, True, False, True, True]
    good = [0, 1, 3, 4]
    expected = model.encode([decode_image((folder / f"{i}.png").read_bytes()) for i in good]).numpy()
    np.testing.assert_allclose(store.embeddings[good], expected, atol=1e-5)
    assert "1 unreadable images skipped" in caplog.text


def _model_dir(model, tmp_path):
    out = tmp_path / "model"
    if not out.exists():
        model.save(out)
    return out


def test_manifest_refuses_a_mismatched_model(model, demo_root, tmp_path):
    items = open_items(demo_root, domains=["textures"], splits=["val"])
    store = embed_items(model, items, tmp_path / "s", batch_size=16, workers=0)
    store.check_model(model.config_hash())  # the right model passes
    other = build_model(TINY, dim=16, image_size=32)
    with pytest.raises(UniretError, match="re-embed with the same model"):
        store.check_model(other.config_hash())
    # Embedding again with another model never reuses the store; it replaces it only with overwrite.
    with pytest.raises(UniretError, match="--overwrite"):
        embed_items(other, items, tmp_path / "s", batch_size=16, workers=0)
    again = embed_items(other, items, tmp_path / "s", batch_size=16, workers=0, overwrite=True)
    assert again.model_hash == other.config_hash()
    assert store.embeddings.dtype == np.float16


def test_torchrun_two_ranks_match_one_process(model_dir, demo_lmdb, tmp_path):
    args = ["embed", "--model", str(model_dir), "--data", str(demo_lmdb), "--domain", "shapes",
            "--split", "index", "--batch-size", "8", "--workers", "0", "--dtype", "float32"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "uniret.cli", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = EmbeddingStore(tmp_path / "one"), EmbeddingStore(tmp_path / "two")
    # no gather: each rank wrote its own part, rank 0 only the manifest
    assert [(p.name, p.start) for p in two.parts] == [("part-00000-of-00002", 0), ("part-00001-of-00002", one.count // 2)]
    assert [it.to_json() for it in one.items] == [it.to_json() for it in two.items]
    assert one.model_hash == two.model_hash
    np.testing.assert_allclose(two.embeddings, one.embeddings, atol=1e-5)


def test_cli_embed_collection_with_filters_and_bad_options(model_dir, demo_root, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["embed", "--model", str(model_dir), "--data", str(demo_root), "--out", str(out),
                 "--domain", "textures", "--split", "val", "--workers", "0"]) == 0
    store = EmbeddingStore(out)
    assert {(it.domain, it.split) for it in store.items} == {("textures", "val")}
    assert store.manifest["dtype"] == "float16"
    capsys.readouterr()
    for bad in (["--batch-size", "0"], ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--batch-size", "-1"],
                ["--domain", "nope"]):
        code = main(["embed", "--model", str(model_dir), "--data", str(demo_root), "--out", str(tmp_path / "x"),
                     "--workers", "0", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        # bad values are usage errors (2), a missing GPU or unknown domain an input error (1)
        assert code in (1, 2) and len(err) == 1 and err[0].startswith("error: "), (bad, err)
