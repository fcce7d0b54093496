"""On-disk IVF indexes (``uniret index build --on-disk``): results equal to an in-RAM IVF with the same
quantizer, the multi-machine steps, resume after SIGKILL of a real build, search RSS below the index
size, add/remove, and bad input (one-line errors)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from uniret.cli import main
from uniret.data.collection import Item
from uniret.embed.store import write_store
from uniret.index.ondisk import build_ondisk, load_trained
from uniret.index.searcher import Searcher

CLI = "import sys; from uniret.cli import main; sys.exit(main(sys.argv[1:]))"


def clustered(n, d=16, clusters=40, noise=0.35, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_store(path, x, start=0, failed=None):
    items = [Item(path=f"img{i}.png", domain="ab"[i % 2], split="test", position=i, class_ids=(i % 5,))
             for i in range(start, start + len(x))]
    return write_store(path, x, items, model={"config_hash": "m1", "backbone": "test"}, failed=failed)


def twin(searcher, vectors, ids):
    """The in-RAM IVF with the on-disk index's quantizer, holding the same (fp16-rounded) vectors."""
    index = load_trained(searcher.version_dir, searcher.manifest)
    index.add_with_ids(vectors.astype(np.float16).astype(np.float32), np.asarray(ids, dtype=np.int64))
    index.nprobe = searcher.index.nprobe
    return index


def one_error_line(capsys) -> str:
    """The refusal as a user sees it: after any progress lines of the work done before it, ONE
    ``error:`` line, the last, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and "Traceback" not in err, err
    assert sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


def build_args(store, out, *extra):
    return ["index", "build", str(store), "--out", str(out), "--on-disk", *extra]


def test_steps_equal_in_ram_ivf_and_a_damaged_shard_is_one_line(tmp_path, capsys):
    x = clustered(3000)
    make_store(tmp_path / "s", x, failed={"7": "unreadable"})
    idx = tmp_path / "idx"
    args = build_args(tmp_path / "s", idx, "--kind", "ivf-sq8", "--shard-rows", "1000")
    assert main(args + ["--merge"]) == 1 and "--train-only" in one_error_line(capsys)
    assert main(args + ["--train-only"]) == 0
    assert main(args + ["--merge"]) == 1 and "not encoded yet" in one_error_line(capsys)
    assert main(args + ["--encode-part", "0/2", "--workers", "1"]) == 0
    assert main(args + ["--encode-part", "1/2", "--workers", "2"]) == 0
    shard = idx / "ondisk-build" / "shards" / "s00001"
    good = (shard / "ivf.faiss").read_bytes()
    (shard / "ivf.faiss").write_bytes(good[: len(good) // 2])  # truncated
    assert main(args + ["--merge"]) == 1 and "s00001 is damaged" in one_error_line(capsys)
    (shard / "ivf.faiss").write_bytes(b"\0" * len(good))  # right size, garbage
    assert main(args + ["--merge"]) == 1 and "s00001 is damaged" in one_error_line(capsys)
    (shard / "ivf.faiss").write_bytes(good)
    assert main(args + ["--merge"]) == 0
    capsys.readouterr()
    assert not (idx / "ondisk-build").exists()

    s = Searcher.open(idx, gpu="off", device="cpu")
    assert s.manifest["on_disk"]["shards"] == 3 and s.count == 2999 and 7 not in s.ids
    ref = twin(s, x[s.ids], s.ids)
    queries = clustered(40, seed=9)
    for nprobe in (1, 3, 8):
        s.index.nprobe = ref.nprobe = nprobe
        d_disk, i_disk = s.index.search(queries, 20)
        d_ram, i_ram = ref.search(queries, 20)
        np.testing.assert_array_equal(i_disk, i_ram)
        np.testing.assert_array_equal(d_disk, d_ram)
    assert main(["index", "info", str(idx)]) == 0
    assert "on-disk: lists.ivfdata" in capsys.readouterr().out


def test_ivf_flat_and_pq_search_equal_in_ram(tmp_path):
    x = clustered(2000, d=16, seed=1)
    make_store(tmp_path / "s", x)
    for kind in ("ivf-flat", "ivf-pq"):
        build_ondisk(tmp_path / "s", tmp_path / kind, kind=kind, workers=1, tune_sample=200, recall_k=20)
        s = Searcher.open(tmp_path / kind, gpu="off", device="cpu")
        ref = twin(s, x[s.ids], s.ids)
        queries = clustered(30, seed=2)
        d_disk, i_disk = s.index.search(queries, 10)
        d_ram, i_ram = ref.search(queries, 10)
        np.testing.assert_array_equal(i_disk, i_ram)
        np.testing.assert_array_equal(d_disk, d_ram)
        if kind == "ivf-flat":  # the Searcher adds nothing for lossless codes
            scores, ids = s.search(queries, 10)
            np.testing.assert_array_equal(ids, i_ram)
            found = i_ram >= 0  # Faiss pads short lists with -FLT_MAX, the Searcher with -inf
            np.testing.assert_allclose(scores[found], d_ram[found], atol=1e-6)
            assert np.all(scores[~found] == -np.inf)
            # exact paths stream the raw vectors: a domain filter finds the best item of that domain
            _, top = s.search(x[4:6], 1, domain="a")
            assert top[:, 0].tolist() == [4, s.search(x[5:6], 2, domain="a")[1][0, 0]]


def test_store_in_parts_and_extra_fields(tmp_path):
    from test_store_parts import write_parts

    x = clustered(1500, seed=11)
    items = [Item(f"p{i}.png", "ab"[i % 2], "test", i, (i % 5,), {"url": f"https://example.org/{i}"})
             for i in range(1500)]
    write_parts(tmp_path / "s", items, x, [0, 1, 2], 3, model_hash="m1", failed=[4], dim=16)
    # shards of 400 rows cross the parts' boundaries (500 rows each)
    build_ondisk(tmp_path / "s", tmp_path / "idx", kind="ivf-flat", workers=1, shard_rows=400, tune_sample=100,
                 recall_k=10)
    s = Searcher.open(tmp_path / "idx", gpu="off", device="cpu")
    assert s.count == 1499 and 4 not in s.ids and s.manifest["on_disk"]["shards"] == 4
    ref = twin(s, x[s.ids], s.ids)
    np.testing.assert_array_equal(s.index.search(x[::40], 10)[1], ref.search(x[::40], 10)[1])
    assert s.metadata([700])[0]["url"] == "https://example.org/700"


def test_resume_after_sigkill_of_a_real_build(tmp_path):
    x = clustered(2000, seed=3)
    make_store(tmp_path / "s", x)
    idx = tmp_path / "idx"
    argv = [sys.executable, "-c", CLI, *build_args(tmp_path / "s", idx, "--kind", "ivf-flat", "--shard-rows", "500",
                                                   "--workers", "1")]
    env = dict(os.environ, UNIRET_TEST_SLEEP_SHARD="60")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = idx / "ondisk-build" / "shards" / "s00000"
    try:
        deadline = time.time() + 90
        while not (first / "shard.json").is_file():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its worker
        proc.wait()
    stamp = (first / "ivf.faiss").stat()
    assert not (idx / "CURRENT").exists()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 of 4 shard(s) already encoded; encoding 3" in done.stderr
    assert "trained on" not in done.stderr  # the quantizer was kept too
    assert stamp.st_mtime_ns > 0 and not (idx / "ondisk-build").exists()
    s = Searcher.open(idx, gpu="off", device="cpu")
    ref = twin(s, x[s.ids], s.ids)
    d_disk, i_disk = s.index.search(x[:25], 10)
    d_ram, i_ram = ref.search(x[:25], 10)
    np.testing.assert_array_equal(i_disk, i_ram)
    np.testing.assert_array_equal(d_disk, d_ram)


RSS_PROBE = """
import json, sys
import faiss
import numpy as np
from uniret.index.searcher import Searcher

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

s = Searcher.open(sys.argv[1], gpu="off", device="cpu")
queries = np.load(sys.argv[2])
s.search(queries[:1], 10)  # first-use allocations and code pages
before = rss()
s.search(queries, 10)
lists = faiss.downcast_InvertedLists(s.index.invlists)
_, probed = s.index.quantizer.search(queries, s.index.nprobe)
probed = np.unique(probed[probed >= 0])
touched = sum(lists.list_size(int(i)) for i in probed) * (lists.code_size + 8)
print(json.dumps({"delta": rss() - before, "touched": int(touched), "probed": len(probed),
                  "ondisk": isinstance(lists, faiss.OnDiskInvertedLists), "read_only": bool(lists.read_only)}))
"""


def test_search_rss_stays_below_the_index_size(tmp_path):
    x = clustered(80_000, d=64, clusters=300, noise=0.5, seed=4)
    make_store(tmp_path / "s", x)
    build_ondisk(tmp_path / "s", tmp_path / "idx", kind="IVF256,Flat", workers=1, tune_sample=20, target_recall=0.3,
                 recall_k=10)
    lists_bytes = (Searcher.open(tmp_path / "idx", gpu="off", device="cpu").version_dir / "lists.ivfdata").stat().st_size
    np.save(tmp_path / "q.npy", clustered(8, d=64, clusters=300, noise=0.5, seed=5))
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "idx"), str(tmp_path / "q.npy")],
                         capture_output=True, text=True, timeout=120, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["ondisk"] and probe["read_only"]
    # Searching maps in the lists it probes (plus the kernel's read-ahead around each), nothing more;
    # a search path that read the lists whole would add all 21 MB.
    bound = probe["touched"] + probe["probed"] * 512 * 2**10 + 2 * 2**20
    assert bound < lists_bytes / 2 and probe["delta"] <= bound, (probe, lists_bytes)


def test_add_and_remove_on_disk(tmp_path, capsys):
    x = clustered(1600, seed=6)
    make_store(tmp_path / "a", x[:1000])
    make_store(tmp_path / "b", x[900:], start=900)  # 100 already indexed, 600 new
    idx = tmp_path / "idx"
    build_ondisk(tmp_path / "a", idx, kind="ivf-flat", workers=1, tune_sample=100, recall_k=20)
    assert main(["index", "add", str(idx), str(tmp_path / "b"), "--workers", "1", "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)["rows"][0]
    assert (res["added"], res["skipped_present"], res["count"]) == (600, 100, 1600)
    s = Searcher.open(idx, gpu="off", device="cpu")
    assert s.manifest["on_disk"] and s.ids.tolist() == list(range(1600))
    assert s.metadata([1200])[0]["path"] == "img1200.png"  # new items keep their store metadata
    _, top = s.search(x[1200:1203], 1)
    assert top[:, 0].tolist() == [1200, 1201, 1202]
    _, top = s.search(x[1200:1202], 1, domain="b")  # domain codes kept per row (domains.npy)
    assert top[0, 0] != 1200 and top[1, 0] == 1201 and set(s.row_domains[s.rows_of(top[:, 0])]) == {"b"}
    ref = twin(s, x, np.arange(1600))  # store b's rows 100..699 got ids 1000..1599
    d_disk, i_disk = s.index.search(x[::50], 10)
    d_ram, i_ram = ref.search(x[::50], 10)
    np.testing.assert_array_equal(i_disk, i_ram)
    np.testing.assert_array_equal(d_disk, d_ram)

    (tmp_path / "ids.txt").write_text("3\n1200\n99999\n")
    assert main(["index", "remove", str(idx), "--ids", str(tmp_path / "ids.txt"), "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)["rows"][0]
    assert (res["removed"], res["not_present"], res["count"]) == (2, 1, 1598)
    s = Searcher.open(idx, gpu="off", device="cpu")
    scores, ids = s.search(x[[3, 1200]], 50)
    assert not np.isin(ids, [3, 1200]).any() and s.metadata([3])[0] is None
    assert s.row_domains.tolist() == [m["domain"] for m in s.metadata(s.ids)]
    import faiss

    ref.remove_ids(faiss.IDSelectorBatch(np.array([3, 1200], dtype=np.int64)))
    np.testing.assert_array_equal(s.index.search(x[::50], 10)[1], ref.search(x[::50], 10)[1])
    assert len(s.vectors_for([5])) == 1 and np.allclose(s.vectors_for([5])[0], x[5], atol=1e-3)
    np.save(tmp_path / "all.npy", np.arange(1600))
    assert main(["index", "remove", str(idx), "--ids", str(tmp_path / "all.npy")]) == 0
    s = Searcher.open(idx, gpu="off", device="cpu")
    assert s.count == 0 and (s.search(x[:2], 5)[1] == -1).all()


def test_bad_input_is_one_line(tmp_path, capsys):
    x = clustered(3000, seed=7)
    make_store(tmp_path / "s", x)
    s, out = tmp_path / "s", tmp_path / "idx"
    for argv, msg in [
        (build_args(s, out, "--max-memory", "100M"), "needs at least"),
        (build_args(s, out, "--workers", "0"), "--workers must be 1.."),
        (build_args(s, out, "--workers", "-2"), "--workers must be 1.."),
        (build_args(s, out, "--workers", "100000"), "--workers must be 1.."),
        (build_args(s, out, "--kind", "flat"), "needs an IVF kind"),
        (build_args(s, out, "--kind", "hnsw"), "needs an IVF kind"),
        (build_args(s, out, "--kind", "HNSW32"), "needs an IVF index"),
        (build_args(s, out, "--kind", "IVF4096,Flat"), "4096 lists but there are only 3,000 vectors"),
        (["index", "build", str(s), "--out", str(out), "--kind", "IVF4096,Flat"], "4096 lists"),  # in RAM too
        (build_args(s, out, "--encode-part", "2/2"), "0 <= I < N"),
        (build_args(s, out, "--train-only", "--merge"), "separate steps"),
        (["index", "build", str(s), "--out", str(out), "--train-only"], "add --on-disk"),
        (["index", "build", str(s), "--out", str(out), "--workers", "2"], "add --on-disk"),
    ]:
        assert main(argv) in (1, 2), argv
        assert msg in one_error_line(capsys), argv
    assert not (out / "CURRENT").exists()

    build_ondisk(s, out, kind="ivf-flat", workers=1, tune_sample=50, recall_k=10)
    data = Searcher.open(out, gpu="off", device="cpu").version_dir / "lists.ivfdata"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4096)
    assert main(["search", str(out), "id:3"]) == 1
    assert "lists.ivfdata is damaged or missing" in one_error_line(capsys)
    assert main(["index", "remove", str(out), "--ids", str(tmp_path / "none.txt")]) == 1
    capsys.readouterr()
