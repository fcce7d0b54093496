"""Shared fixtures: one demo collection and its packed store per test session."""

from __future__ import annotations

import os

import pytest

# Tests run on 2 cores next to other work: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo collection (4 domains, about 300 images)."""
    from uniret.data.demo import make_demo

    root = tmp_path_factory.mktemp("demo") / "demo"
    make_demo(root, seed=0, scale=0.25)
    return root


@pytest.fixture(scope="session")
def demo_lmdb(demo_root, tmp_path_factory):
    """The demo collection packed into an LMDB store."""
    from uniret.data.store import PackOptions, pack

    out = tmp_path_factory.mktemp("packed") / "demo.lmdb"
    pack(demo_root, out, PackOptions(max_side=64, quality=90))
    return out


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import problem means no usable GPU
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def benchmark_script():
    """Load a script of benchmarks/ as a module: ``benchmark_script("bench_methods")``."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random-init `timm:test_resnet` model (16-d, 32 px) made by `uniret model init`; read-only."""
    from uniret.cli import main

    out = tmp_path_factory.mktemp("model") / "m"
    assert main(["model", "init", "--backbone", "timm:test_resnet", "--out", str(out), "--dim", "16",
                 "--image-size", "32"]) == 0
    return out


@pytest.fixture(scope="session")
def image_index(demo_root, tmp_path_factory):
    """A random-init model, the demo collection's test + index splits embedded with it, and an index
    holding the model copy, all made through the real CLI. Returns the folder with model/ store/ index/."""
    from uniret.cli import main

    tmp = tmp_path_factory.mktemp("image_index")
    assert main(["model", "init", "--backbone", "timm:test_resnet", "--out", str(tmp / "model"), "--dim", "16",
                 "--image-size", "32"]) == 0
    assert main(["embed", "--model", str(tmp / "model"), "--data", str(demo_root), "--out", str(tmp / "store"),
                 "--split", "test", "--split", "index", "--workers", "0", "--device", "cpu"]) == 0
    assert main(["index", "build", str(tmp / "store"), "--out", str(tmp / "index")]) == 0
    return tmp
