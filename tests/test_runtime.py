"""`--runtime torch|onnx|auto` in the search layer, the server and `embed`; one owner of the model
(a model on cuda:1 stays there); JPEG queries decoded at a reduced scale."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import LiveServer

import uniret
from uniret.cli import main
from uniret.embed.store import EmbeddingStore
from uniret.serve import ServeSettings, create_app

pytest.importorskip("onnxruntime")


def query_files(demo_root, image_index, n: int = 12) -> list[Path]:
    store = EmbeddingStore(image_index / "store")
    return [demo_root / "images" / store.items[i].path for i in np.linspace(0, store.count - 1, n).astype(int)]


def test_the_index_copy_keeps_its_graph_and_auto_runs_it(image_index):
    assert (image_index / "index" / "model" / "model.onnx").is_file()  # stored by `index build`
    assert uniret.open_index(image_index / "index").runtime == "onnx"  # auto on a CPU
    assert uniret.open_index(image_index / "index", runtime="torch").runtime == "torch"
    with pytest.raises(uniret.errors.UsageError, match="torch, onnx or auto"):
        uniret.open_index(image_index / "index", runtime="tensorflow")


@pytest.mark.parametrize("max_batch", [1, 32])
def test_the_server_answers_identically_with_torch_and_onnx(image_index, demo_root, max_batch):
    uploads = [(p.name, p.read_bytes()) for p in query_files(demo_root, image_index)]
    answers = {}
    for runtime in ("torch", "onnx"):
        index = uniret.open_index(image_index / "index", runtime=runtime)
        assert index.runtime == runtime
        with LiveServer(create_app(index, ServeSettings(max_batch=max_batch))) as url:
            with httpx.Client(base_url=url, timeout=60) as client:
                one = [client.post("/search", params={"k": 5}, files={"file": u}).json() for u in uploads]
                many = client.post("/search", params={"k": 5}, files=[("file", u) for u in uploads]).json()
        answers[runtime] = [r["results"][0]["results"] for r in one] + [q["results"] for q in many["results"]]
    torch_rows, onnx_rows = answers["torch"], answers["onnx"]
    assert len(torch_rows) == 2 * len(uploads)
    for a, b in zip(torch_rows, onnx_rows):
        assert [r["id"] for r in a] == [r["id"] for r in b]
        np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-4)
    assert any(a[0]["score"] > 0.999 for a in torch_rows)  # stored images find themselves


def test_onnx_search_needs_neither_torch_nor_the_weights(image_index, demo_root, tmp_path):
    index_copy = tmp_path / "index"
    shutil.copytree(image_index / "index", index_copy)
    (index_copy / "model" / "model.safetensors").unlink()
    queries = [str(p) for p in query_files(demo_root, image_index, 3)]
    script = (
        "import json, sys, uniret\n"
        f"idx = uniret.open_index({str(index_copy)!r}, runtime='onnx')\n"
        f"res = idx.search({queries!r}, k=3).to_dicts()\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'results': res}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["torch"] is False
    reference = uniret.open_index(image_index / "index", runtime="torch").search(queries, k=3).to_dicts()
    for a, b in zip(out["results"], reference):
        assert [r["id"] for r in a["results"]] == [r["id"] for r in b["results"]]


def test_a_model_on_cuda_1_stays_there(image_index, monkeypatch):
    """A fake device mapping: two visible GPUs, and moving a module records where it was sent."""
    import onnxruntime
    import torch

    import uniret.utils
    from uniret.embed.onnx import providers_for

    monkeypatch.setattr(uniret.utils, "_visible_gpus", lambda with_faiss: 2)
    sent = []

    def fake_to(module, *args, **kwargs):
        sent.append(str(args[0]) if args else str(kwargs.get("device")))
        return module

    monkeypatch.setattr(torch.nn.Module, "to", fake_to)
    index = uniret.open_index(image_index / "index", device="cuda:1", runtime="torch")
    assert index.device == "cuda:1"
    index.load_model()
    assert sent and set(sent) == {"cuda:1"}
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers_for("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def test_embed_with_onnx_runtime_matches_torch(image_index, demo_root, tmp_path):
    stores = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / f"store-{runtime}"
        assert main(["embed", "--model", str(image_index / "model"), "--data", str(demo_root), "--out", str(out),
                     "--split", "test", "--workers", "0", "--device", "cpu", "--dtype", "float32",
                     "--runtime", runtime]) == 0
        stores[runtime] = EmbeddingStore(out)
    a, b = (stores[r].read_rows(0, stores[r].count).astype(np.float32) for r in ("torch", "onnx"))
    assert a.shape == b.shape and len(a) > 10
    assert (a * b).sum(axis=1).min() > 0.9999
    assert stores["torch"].model_hash == stores["onnx"].model_hash


def test_large_jpeg_queries_are_decoded_at_a_reduced_scale(image_index, demo_root):
    from uniret.index.queries import decode_query_image

    photo = Image.open(query_files(demo_root, image_index, 1)[0]).convert("RGB").resize((640, 480))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    index = uniret.open_index(image_index / "index")
    draft = index.draft_size()
    assert draft[0] == draft[1] and 32 <= draft[0] < 40  # the resize target of the model's 32 px input
    reduced = decode_query_image(data, "q", draft)
    assert reduced.size == (80, 60) and reduced.mode == "RGB"  # 1/8 of 640 x 480, still >= 32 on both sides
    assert decode_query_image(data, "q").size == (640, 480)
    full, small = index.embed_images([decode_query_image(data, "q"), reduced])
    assert float(full @ small) > 0.99
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert decode_query_image(png.getvalue(), "q", draft).size == (640, 480)  # only JPEGs have a reduced decode
