"""The README's "Your own images" section, run as written on a generated folder (classes as
subfolders, a phone photo stored sideways with EXIF orientation beside its upright twin): one
command builds the index, `search --html` shows thumbnails without `--images`, the sideways photo
finds its twin, `uniret eval FOLDER` reports mAP@100, the server shows pictures, and the Python
example runs.

The section's commands use the default model (pretrained EfficientNet-Lite0 at 224 px, slow on a
CPU); here the default model is a small random-init one, so the test checks the commands and the
plumbing, not the pretrained weights (those are tested with the default model itself)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import httpx
import pytest
from folders import make_photo_folder, pattern
from servers import LiveServer

from uniret.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    start = text.index("## Your own images")
    end = text.index("\n## ", start + 5)
    return re.findall(r"```(\w*)\n(.*?)```", text[start:end], flags=re.S)


def small_default_model(device: str = "cpu"):
    import torch

    from uniret.embed.model import build_model

    torch.manual_seed(0)
    return build_model("timm:test_resnet", dim=32, image_size=64).to(device).eval()


@pytest.fixture
def photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("uniret.embed.default.default_model", small_default_model)
    monkeypatch.setattr("uniret.embed.default.default_available", lambda: True)
    twins = make_photo_folder(tmp_path / "my-photos")
    shutil.copy(tmp_path / "my-photos" / twins["phone"], tmp_path / "query.jpg")  # the sideways photo
    (tmp_path / "more-photos" / "bird").mkdir(parents=True)
    pattern(777).save(tmp_path / "more-photos" / "bird" / "0.jpg")
    return tmp_path, twins


def run(line: str, capsys) -> str:
    capsys.readouterr()
    assert main(shlex.split(line)[1:]) == 0, line
    return capsys.readouterr().out


def test_readme_your_own_images(photos, capsys):
    tmp, twins = photos
    blocks = section_blocks()
    shell = [b for lang, b in blocks if lang == "bash"]
    python = [b for lang, b in blocks if lang == "python"]
    assert len(shell) == 1 and len(python) == 1
    lines = [ln.split("#", 1)[0].strip() for ln in shell[0].splitlines()]
    commands = [ln for ln in lines if ln.startswith("uniret ")]
    assert commands[0] == "uniret index build my-photos --out my-index"  # one command builds the index
    for line in commands:
        if line.startswith("uniret serve"):
            check_serve(line, tmp)
            continue
        out = run(line, capsys)
        if line.startswith("uniret index build"):
            assert (tmp / "my-index" / "CURRENT").is_file() and (tmp / "my-index" / "model").is_dir()
        elif line.startswith("uniret search") and "--html" in line:
            rows = [r.split() for r in out.splitlines()[2:]]
            # the sideways photo and its upright twin, nearly identical once the EXIF turn is applied
            assert {rows[0][4], rows[1][4]} == {twins["phone"], twins["twin"]}
            assert float(rows[1][3]) > 0.99 and float(rows[2][3]) < float(rows[1][3])
            page = (tmp / "results.html").read_text()
            assert page.count("data:image/") == 11  # the query and 10 results: pictures without --images
        elif "--where" in line:
            rows = [r.split() for r in out.splitlines()[2:] if r.strip()]
            assert rows and all(r[-1] == "cat" for r in rows)
        elif line.startswith("uniret eval"):
            header = out.splitlines()[1].split()
            assert "mAP@100" in header
            mean = next(r.split() for r in out.splitlines() if r.split()[1:2] == ["mean"])
            assert 0 < float(mean[header.index("mAP@100")]) <= 1
    # the Python example, as written
    namespace: dict = {}
    exec(compile(python[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["vectors"].shape == (1, 32)
    assert namespace["index"].count == 18  # 17 photos + the bird added from more-photos
    assert all(r["label"] == "cat" for r in namespace["results"].rows())
    assert (tmp / "vector-index" / "CURRENT").is_file()


def check_serve(line: str, tmp: Path) -> None:
    """`uniret serve my-index`: the same index opened as the command does, served for a moment."""
    import uniret
    from uniret.serve import ServeSettings, create_app

    args = shlex.split(line)
    assert args[:2] == ["uniret", "serve"] and len(args) == 3
    index = uniret.open_index(tmp / args[2])
    with LiveServer(create_app(index, ServeSettings())) as url, httpx.Client(base_url=url, timeout=60) as client:
        info = client.get("/info")
        assert info.status_code == 200 and str(tmp) not in info.text  # no absolute server paths
        assert info.json()["images"] == ["../my-photos"]
        image = client.get("/items/0/image")
        assert image.status_code == 200 and image.content == (tmp / "my-photos" / "cat" / "0.jpg").read_bytes()
