"""Your own images: labels from the folder layout and metadata files, EXIF orientation, one-step
`uniret index build FOLDER` / `index add INDEX FOLDER` remembering the image source, `uniret eval
FOLDER` and `data check FOLDER`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from folders import make_photo_folder, pattern, sideways_jpeg

from uniret.cli import main
from uniret.data import open_collection, open_items
from uniret.data.folder import LabelledFolder, list_folder
from uniret.data.images import decode_image
from uniret.errors import UniretError


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "m"
    assert main(["model", "init", "--backbone", "timm:test_resnet", "--image-size", "64", "--out", str(out)]) == 0
    return out


def test_exif_orientation_is_applied_when_decoding():
    upright = pattern(5)
    decoded = np.asarray(decode_image(sideways_jpeg(upright)), dtype=float)
    assert decoded.shape == (64, 64, 3)
    assert np.abs(decoded - np.asarray(upright, dtype=float)).mean() < 3  # JPEG loss only
    stored = np.asarray(upright.transpose(0 + 2), dtype=float)  # ROTATE_90: what the file holds
    assert np.abs(decoded - stored).mean() > 20


def test_avif_where_pillow_opens_it(tmp_path):
    from PIL import Image, features

    from uniret.data.images import IMAGE_EXTENSIONS

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    assert ".avif" in IMAGE_EXTENSIONS
    (tmp_path / "a").mkdir()
    pattern(3).save(tmp_path / "a" / "x.avif", quality=90)
    items = open_items(tmp_path)
    assert [it.path for it in items] == ["a/x.avif"]
    decoded = np.asarray(decode_image(items.get_image_bytes(0)), dtype=float)
    assert np.abs(decoded - np.asarray(pattern(3), dtype=float)).mean() < 12
    assert Image.open(tmp_path / "a" / "x.avif").format == "AVIF"


def test_one_step_index_from_webdataset_shards(tiny_model, tmp_path, capsys):
    from shards import write_shards

    paths = write_shards(tmp_path / "shards", shards=2, per_shard=3)
    spec = str(tmp_path / "shards" / "{00000..00001}.tar")
    assert len(paths) == 2
    assert main(["index", "build", spec, "--out", str(tmp_path / "idx"), "--model", str(tiny_model),
                 "--format", "json"]) == 0
    manifest = json.loads(capsys.readouterr().out)["manifest"]
    assert manifest["count"] == 6 and manifest["images"] == []  # tar members give no folder to show


def test_layouts_by_depth_and_flag(tmp_path):
    make_photo_folder(tmp_path / "cls", per_class=2)
    listing = list_folder(tmp_path / "cls")
    assert listing.layout == "class"
    items = open_items(tmp_path / "cls")
    by_path = {it.path: it for it in items}
    # sorted class names numbered from 0, the name kept as `label` (the imagefolder convention)
    assert by_path["cat/0.jpg"].class_ids == (0,) and by_path["cat/0.jpg"].extra["label"] == "cat"
    assert by_path["tree/1.jpg"].class_ids == (2,) and by_path["tree/1.jpg"].domain is None
    # root/<domain>/<class>/img: by depth, classes numbered per domain
    for domain in ("photos", "sketches"):
        make_photo_folder(tmp_path / "dom" / domain, classes=("b", "a") if domain == "photos" else ("z",),
                          per_class=1)
    items = {it.path: it for it in open_items(tmp_path / "dom")}
    assert items["photos/a/0.jpg"].domain == "photos" and items["photos/a/0.jpg"].class_ids == (0,)
    assert items["photos/b/0.jpg"].class_ids == (1,) and items["sketches/z/0.jpg"].class_ids == (0,)
    # flat: images at mixed depths get no label; a layout flag that does not fit is one line
    shutil.copy(tmp_path / "cls" / "cat" / "0.jpg", tmp_path / "cls" / "loose.jpg")
    assert list_folder(tmp_path / "cls").layout == "flat"
    assert all(it.class_ids == () for it in open_items(tmp_path / "cls"))
    with pytest.raises(UniretError, match="--layout class needs every image at root/<class>/<image>"):
        list_folder(tmp_path / "cls", layout="class")


def test_metadata_csv_and_jsonl_beside_the_images(tmp_path):
    make_photo_folder(tmp_path, per_class=2)
    (tmp_path / "metadata.csv").write_text("file_name,price,caption\ncat/0.jpg,12.5,a cat\ndog/1.jpg,30,\n")
    (tmp_path / "tree" / "metadata.jsonl").write_text('{"file_name": "0.jpg", "price": 7, "id": "x1"}\n')
    items = {it.path: it for it in open_items(tmp_path)}
    assert items["cat/0.jpg"].extra == {"label": "cat", "price": 12.5, "caption": "a cat"}
    assert items["dog/1.jpg"].extra == {"label": "dog", "price": 30}  # numbers typed, empty cells dropped
    assert items["tree/0.jpg"].extra == {"label": "tree", "price": 7, "meta_id": "x1"}  # reserved names kept apart
    (tmp_path / "metadata.csv").write_text("name,price\ncat/0.jpg,1\n")
    with pytest.raises(UniretError, match="file_name column"):
        open_items(tmp_path)


def test_labelled_folder_as_collection(tmp_path):
    make_photo_folder(tmp_path / "pics", per_class=2)
    coll = open_collection(tmp_path / "pics")
    assert isinstance(coll, LabelledFolder) and coll.domains == ["pics"]
    assert coll.splits("pics") == ["test"] and coll.query_index_splits("pics", "test") == ("test", "test")
    recs = coll.records("pics", "test")
    assert len(recs) == 8 and recs[0].path == "cat/0.jpg" and recs[0].extra["label"] == "cat"
    assert coll.get_image_bytes("pics", "test", 0) == (tmp_path / "pics" / "cat" / "0.jpg").read_bytes()


def test_one_step_index_search_add_eval(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    twins = make_photo_folder(tmp_path / "photos")
    assert main(["index", "build", "photos", "--out", "idx", "--model", str(tiny_model)]) == 0
    assert not (tmp_path / "idx" / "embeddings").exists()  # the temporary store is gone
    manifest = json.loads((tmp_path / "idx" / "v000001" / "manifest.json").read_text())
    assert manifest["images"] == [{"path": "../photos", "absolute": str(tmp_path / "photos"), "first_id": 0,
                                   "stop_id": 17}]
    capsys.readouterr()
    # the phone photo (stored sideways) finds its upright twin right after itself
    assert main(["search", "idx", f"photos/{twins['phone']}", "--k", "3", "--html", "page.html",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {rows[0]["path"], rows[1]["path"]} == {twins["phone"], twins["twin"]}
    assert rows[1]["score"] > 0.99 and rows[2]["score"] < rows[1]["score"]
    page = (tmp_path / "page.html").read_text()
    assert page.count("data:image/") == 4 and "no image" not in page.lower()  # query + 3 results, no --images
    # the index moved away from its images: one warning line, no pictures; --images overrides
    shutil.move(tmp_path / "photos", tmp_path / "moved")
    capsys.readouterr()
    assert main(["search", "idx", "id:0", "--k", "2", "--html", "p2.html"]) == 0
    err = capsys.readouterr().err
    assert sum("no longer there" in line for line in err.splitlines()) == 1
    assert main(["search", "idx", "id:0", "--k", "2", "--images", "moved", "--html", "p3.html"]) == 0
    assert (tmp_path / "p3.html").read_text().count("data:image/") == 3
    shutil.move(tmp_path / "moved", tmp_path / "photos")
    # index add FOLDER: embedded with the index's model copy; pictures of both folders found
    more = tmp_path / "more"
    (more / "bird").mkdir(parents=True)
    pattern(4242).save(more / "bird" / "0.jpg")
    assert main(["index", "add", "idx", "more"]) == 0
    capsys.readouterr()
    assert main(["index", "add", "idx", "more", "--format", "json"]) == 0  # again: nothing new
    assert json.loads(capsys.readouterr().out)["rows"][0]["skipped_present"] == 1
    import uniret

    index = uniret.open_index(tmp_path / "idx")
    assert index.count == 18
    assert index.image_bytes(17) == (more / "bird" / "0.jpg").read_bytes()
    assert index.image_bytes(0) == (tmp_path / "photos" / "cat" / "0.jpg").read_bytes()
    assert index.info()["images"] == ["../photos", "../more"]  # no absolute server paths
    # uniret eval FOLDER: every image a query against the others
    assert main(["eval", "photos", "--model", str(tiny_model), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    mean = next(r for r in report["rows"] if r["domain"] == "mean")
    assert mean["queries"] == 17 and 0 < mean["mAP@100"] <= 1
    assert main(["data", "check", "photos", "--format", "json"]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["rows"] == [{"domain": "photos", "split": "test", "images": 17, "classes": 3, "min": 5,
                              "median": 5, "max": 7}]
    assert "labels from its subfolders" in check["notes"][0]


def test_one_step_build_errors(tiny_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["index", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "idx"), "--model",
                 str(tiny_model)]) == 1
    assert "no image files found" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()  # nothing half-made left
    make_photo_folder(tmp_path / "p", per_class=1)
    assert main(["index", "build", str(tmp_path / "p"), "--out", str(tmp_path / "i2"), "--on-disk"]) == 2
    assert "--on-disk builds start from one" in capsys.readouterr().err


def test_no_model_uses_the_default_or_says_how(tmp_path, capsys):
    import inspect

    from uniret.embed.default import default_available
    from uniret.embed.model import build_model

    make_photo_folder(tmp_path / "p", per_class=1)
    args = ["index", "build", str(tmp_path / "p"), "--out", str(tmp_path / "idx")]
    if not default_available():
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: no --model given and no default model installed")
        assert not (tmp_path / "idx").exists()
    elif "head" not in inspect.signature(build_model).parameters:
        pytest.skip("build_model has no head option yet (the model issue adds it)")
    else:
        assert main(args) == 0
        err = capsys.readouterr().err
        assert "loading model (the default)" in err and "no --model given: using the pretrained" in err
        assert (tmp_path / "idx" / "model" / "config.json").is_file()  # saved so that image queries work


def test_interrupted_one_step_build_resumes(tiny_model, tmp_path, capsys, monkeypatch):
    import uniret.index.build as build_module

    make_photo_folder(tmp_path / "p", per_class=2)
    args = ["index", "build", str(tmp_path / "p"), "--out", str(tmp_path / "idx"), "--model", str(tiny_model)]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_build", interrupted)
    assert main(args) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert (tmp_path / "idx" / "embeddings" / "manifest.json").is_file()  # the embeddings are kept
    monkeypatch.undo()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "already holds these 8 embeddings; nothing to do" in err  # not embedded again
    assert (tmp_path / "idx" / "CURRENT").is_file() and not (tmp_path / "idx" / "embeddings").exists()
