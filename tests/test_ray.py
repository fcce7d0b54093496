"""``--engine ray``: embedding and on-disk index encoding as Ray jobs.

One local Ray (2 CPUs) is shared by the module. Checked: the Ray store equals a single-process run
(ids, metadata, failed images, vectors), for an image folder and for tar shards; a run stopped
midway resumes; an embedding actor killed mid-run (SIGKILL of its pid) is restarted by Ray and the
store is still complete and equal, each row once; a 2-node cluster on loopback (`ray start` twice,
stopped by pid) runs the same embed; the on-disk encode under Ray, one task's worker killed, writes
the same lists; a retried shard task writes its shard once; bad options are one-line errors.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shards import write_shards
from test_index_ondisk import build_args, clustered, make_store

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "uniret[ray]")')
pytest.importorskip("ray.data", reason='Ray Data needs pandas (pip install "uniret[ray]")')

from uniret.cli import main  # noqa: E402
from uniret.data import open_items  # noqa: E402
from uniret.embed.extract import embed_items  # noqa: E402
from uniret.embed.model import load_model  # noqa: E402
from uniret.embed.store import EmbeddingStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; `--engine ray` uses a Ray this process already runs."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """41 small images, one of them unreadable."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / "zz-bad.png").write_bytes(b"not an image")
    return root


def embed(model_dir, data, out, *more) -> int:
    return main(["embed", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
                 "--dtype", "float32", "--device", "cpu", "--runtime", "torch", *more])


@pytest.fixture(scope="module")
def one_store(model_dir, images, tmp_path_factory):
    """The reference: one process, one run."""
    out = tmp_path_factory.mktemp("one") / "store"
    assert embed(model_dir, images, out, "--workers", "0") == 0
    return EmbeddingStore(out)


def assert_same_store(a: EmbeddingStore, b: EmbeddingStore) -> None:
    assert a.count == b.count and a.items == b.items and a.failed == b.failed
    assert [i for i, _ in b.iter_items()] == list(range(b.count))  # each row once, in id order
    np.testing.assert_allclose(np.asarray(a.embeddings), np.asarray(b.embeddings), atol=1e-5)


def test_ray_embed_equals_one_process_and_resumes(local_ray, model_dir, images, one_store, tmp_path, monkeypatch,
                                                  caplog):
    """A run stopped by its driver after 4 batches (as by Ctrl-C) keeps the parts it finished; the
    re-run embeds the rest; the store equals one process's; a third run has nothing to do."""
    from uniret.embed import ray_embed

    calls, add = {"n": 0}, ray_embed.PartSink.add

    def stop_after_four(self, batch):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return add(self, batch)

    out, args = tmp_path / "ray", ("--engine", "ray", "--block-rows", "7")
    monkeypatch.setattr(ray_embed.PartSink, "add", stop_after_four)
    assert embed(model_dir, images, out, *args) != 0
    done = [p.name for p in (tmp_path / "ray.partial" / "parts").iterdir() if not p.name.endswith(".partial")]
    assert done and not out.exists()
    monkeypatch.setattr(ray_embed.PartSink, "add", add)
    with caplog.at_level("INFO", logger="uniret"):
        assert embed(model_dir, images, out, *args) == 0
    assert "rows already embedded" in caplog.text
    store = EmbeddingStore(out)
    assert len(store.parts) == 6 and store.manifest["complete"]  # ceil(41 / 7) parts, one manifest
    assert_same_store(one_store, store)
    assert list(store.failed) == ["40"] and "cannot decode" in store.failed["40"]  # listed, not a failed job
    caplog.clear()
    with caplog.at_level("INFO", logger="uniret"):
        assert embed(model_dir, images, out, *args) == 0
    assert "nothing to do" in caplog.text


def our_processes(marker: str) -> list[int]:
    """Pids of this process's descendants whose command line holds ``marker`` (Ray's process titles)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            pid = int(entry.name)
            while pid > 1:
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid == me:
                    found.append(int(entry.name))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_killed_actor_is_retried_and_the_store_is_complete(local_ray, model_dir, images, one_store, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("UNIRET_TEST_SLEEP_RAY_BATCH", "0.4")  # ~11 batches: a window to kill the actor
    model, out, result = load_model(model_dir), tmp_path / "ray", {}

    def run():
        try:
            result["store"] = embed_items(model, open_items(images), out, batch_size=4, dtype="float32",
                                          engine="ray", block_rows=10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed, deadline = [], time.monotonic() + 90
    while not killed and thread.is_alive() and time.monotonic() < deadline:
        pids = our_processes("EmbedActor")
        parts = out.with_name("ray.partial") / "parts"
        if pids and parts.exists() and any(parts.iterdir()):  # mid-run: rows are being written
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[:1]
        time.sleep(0.1)
    thread.join(timeout=180)
    assert killed, "no embedding actor was seen running"
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert_same_store(one_store, result["store"])


def test_ray_embed_of_tar_shards_takes_one_part_per_shard(local_ray, model_dir, tmp_path):
    write_shards(tmp_path / "shards", shards=3, per_shard=4)
    spec = str(tmp_path / "shards" / "{00000..00002}.tar")
    assert embed(model_dir, spec, tmp_path / "one", "--workers", "0") == 0
    assert embed(model_dir, spec, tmp_path / "ray", "--engine", "ray") == 0
    store = EmbeddingStore(tmp_path / "ray")
    assert [p.info["span"]["shards"] for p in store.parts] == [[0, 1, 3], [1, 2, 3], [2, 3, 3]]
    assert_same_store(EmbeddingStore(tmp_path / "one"), store)
    assert store.items[0].extra["url"] == "https://example.org/000000000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, code, says", [
    (["--engine", "ray", "--part", "0/2"], 2, "--engine ray runs every part itself"),
    (["--engine", "ray", "--ray-address", "no port"], 2, "--ray-address 'no port'"),
    (["--engine", "ray", "--ray-address", "127.0.0.1:{port}"], 1, "no Ray head node answers there"),
    (["--ray-address", "auto"], 2, "--ray-address goes with --engine ray"),
    (["--block-rows", "8"], 2, "--block-rows sets the parts of --engine ray"),
    (["--engine", "ray", "--block-rows", "0"], 2, "--block-rows"),
    (["--engine", "ray", "--device", "cuda:1"], 2, "--device 'cuda:1' with --engine ray"),
    (["--engine", "ray", "--workers", "0"], 2, "--workers"),
    (["--engine", "spark"], 2, "--engine"),
])
def test_bad_ray_options_are_one_line_errors(model_dir, images, tmp_path, capsys, args, code, says):
    args = [a.replace("{port}", str(free_port())) for a in args]
    assert embed(model_dir, images, tmp_path / "s", *args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_without_ray_the_engine_says_how_to_install_it(model_dir, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert embed(model_dir, images, tmp_path / "s", "--engine", "ray") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "uniret[ray]"' in err[0], err


def test_two_node_cluster_on_loopback(model_dir, images, one_store, tmp_path):
    """`ray start --head` and a second `ray start --address` (1 CPU each) on this machine; the embed
    connects with --ray-address and spreads over both; the cluster is stopped by pid."""
    temp = tempfile.mkdtemp(prefix="ur", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    # a throw-away cluster bound to loopback: no token to hand from the head to the second node
    env = dict(os.environ, RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT.parent), os.environ.get("PYTHONPATH")])))
    ray_cmd = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([*ray_cmd, "start", "--head", "--port", str(port), "--temp-dir", temp,
                        "--include-dashboard", "false", *common], env=env, check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([*ray_cmd, "start", "--address", f"127.0.0.1:{port}", *common], env=env, check=True,
                       timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = tmp_path / "ray"
        cmd = [sys.executable, "-m", "uniret.cli", "embed", "--model", str(model_dir), "--data", str(images),
               "--out", str(out), "--batch-size", "4", "--dtype", "float32", "--device", "cpu", "--runtime", "torch",
               "--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "--block-rows", "7"]
        done = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert_same_store(one_store, EmbeddingStore(out))
    finally:
        stop_cluster(temp)


def stop_cluster(temp: str) -> None:
    """Stop the processes of our own cluster only: those whose command line names its temp dir."""
    mine = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    mine.append(int(entry.name))
            except OSError:
                continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


def test_ondisk_encode_on_ray_writes_the_same_lists(local_ray, tmp_path, monkeypatch):
    """Train once, then encode the planned shards locally and as Ray tasks, one task's worker killed
    (SIGKILL of its pid) mid-run: Ray re-runs it, and the merged versions hold the same lists, ids and
    vectors, byte for byte."""
    import shutil

    from uniret.index.searcher import Searcher

    make_store(tmp_path / "s", clustered(3000), failed={"7": "unreadable"})
    args = build_args(tmp_path / "s", tmp_path / "local", "--kind", "ivf-sq8", "--shard-rows", "700")
    assert main(args + ["--train-only"]) == 0
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    assert main(args + ["--workers", "1"]) == 0
    ray_args = build_args(tmp_path / "s", tmp_path / "ray", "--kind", "ivf-sq8", "--shard-rows", "700")
    monkeypatch.setenv("UNIRET_TEST_SLEEP_RAY_SHARD", "1.5")  # a window to kill a task
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=main(ray_args + ["--engine", "ray"])))
    thread.start()
    killed, deadline = [], time.monotonic() + 90
    while not killed and thread.is_alive() and time.monotonic() < deadline:
        pids = our_processes("encode_task")
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[:1]
        time.sleep(0.05)
    thread.join(timeout=180)
    assert killed, "no encoding task was seen running"
    assert not thread.is_alive() and result.get("code") == 0, result
    a, b = (Searcher.open(tmp_path / name, gpu="off", device="cpu") for name in ("local", "ray"))
    assert a.manifest["on_disk"]["shards"] == b.manifest["on_disk"]["shards"] == 5
    for name in ("lists.ivfdata", "ids.npy", "vectors.npy"):
        assert (a.version_dir / name).read_bytes() == (b.version_dir / name).read_bytes(), name


def test_a_retried_shard_task_writes_its_shard_once(tmp_path):
    """What a Ray retry of a shard's task does: a half-written temp directory of an earlier attempt is
    replaced; a shard already complete is left as it is."""
    from uniret.index.ondisk.ray_encode import tmp_name
    from uniret.index.ondisk.shards import TRAINED, encode_shard, shard_dir

    make_store(tmp_path / "s", clustered(1200))
    assert main(build_args(tmp_path / "s", tmp_path / "i", "--kind", "ivf-flat", "--shard-rows", "600",
                           "--train-only")) == 0
    build = tmp_path / "i" / "ondisk-build"
    trained = (build / TRAINED).read_bytes()
    (build / "shards" / tmp_name(1)).mkdir()
    (build / "shards" / tmp_name(1) / "vectors.npy").write_bytes(b"half")  # a killed attempt's leftovers
    assert encode_shard(str(build), str(tmp_path / "s"), 1, 1, trained, tmp_name(1)) == 600
    done = shard_dir(build, 1)
    stamp = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert not (build / "shards" / tmp_name(1)).exists()
    assert encode_shard(str(build), str(tmp_path / "s"), 1, 1, trained, tmp_name(1)) == 600
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == stamp


def test_index_engine_ray_needs_an_ondisk_encode(tmp_path, capsys):
    make_store(tmp_path / "s", clustered(100))
    assert main(["index", "build", str(tmp_path / "s"), "--out", str(tmp_path / "i"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine ray runs the encode step of an --on-disk build" in err[0], err
