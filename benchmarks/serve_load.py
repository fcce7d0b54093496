"""Load test of `uniret serve` on loopback against one-shot `uniret search` processes.

Starts the real server (``python -m uniret.cli serve``) on 127.0.0.1, once with micro-batching
(``--max-batch 32``) and once without (``--max-batch 1``), and sends a fixed number of requests
(``--requests``, stopped early at ``--time-cap`` seconds) from 1, 8 and 32 concurrent clients
(asyncio + httpx, keep-alive): image queries (multipart uploads of stored images) and id queries
(JSON). It reports QPS, p50 and p99 latency, then times ``--cli-runs`` one-shot ``uniret search``
processes on the same queries. Targets on a 2-core CPU with the demo model (test_resnet at 64 px):
>= 50 image queries/s at 8 clients, p99 <= 500 ms, >= 20x the one-shot CLI throughput.

    uniret demo --out uniret-demo      # then index every image with the model copy:
    uniret embed --model uniret-demo/run/model --data uniret-demo/data --out store-all
    uniret index build store-all --out index-all
    python benchmarks/serve_load.py --index index-all --images uniret-demo/data
    python benchmarks/serve_load.py --index index-all --images uniret-demo/data --device cuda   # a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uniret.cli", "serve", str(args.index), "--port", str(port), "--device", args.device,
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    if args.images:
        cmd += ["--images", str(args.images)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, requests: list[dict], clients: int, total: int, time_cap: float) -> dict:
    """``total`` requests (cycling through ``requests``) from ``clients`` concurrent clients."""
    import httpx

    latencies, errors, next_i = [], [0], [0]
    start = time.perf_counter()

    async def client_loop(client) -> None:
        while next_i[0] < total and time.perf_counter() - start < time_cap:
            i = next_i[0]
            next_i[0] += 1
            t0 = time.perf_counter()
            r = await client.post("/search", **requests[i % len(requests)])
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors[0] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await client.post("/search", **requests[0])  # warm-up (connection, first batch)
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": errors[0], "seconds": round(wall, 3),
            "qps": round(len(latencies) / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def one_shot_cli(args, queries: list[str], runs: int) -> dict:
    """Wall time of one-shot ``uniret search INDEX QUERY --k K`` processes (one query each)."""
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "uniret.cli", "search", str(args.index), queries[i % len(queries)],
                               "--k", str(args.k)], capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"uniret search failed: {done.stderr[-2000:]}")
    return {"runs": runs, "mean_s": round(float(np.mean(times)), 3), "qps": round(1 / float(np.mean(times)), 3)}


def query_sets(args) -> tuple[list[str], list[int]]:
    """Stored images (their files) and stored ids, spread over the index."""
    import uniret

    index = uniret.open_index(args.index, images=args.images)
    ids = np.linspace(0, index.count - 1, args.queries).round().astype(int)
    stored = index.searcher.ids[ids].tolist()
    if args.images is None:
        raise SystemExit("--images is needed for image queries (the collection root or packed store)")
    paths = []
    for i, item_id in enumerate(stored):
        path = Path(args.tmp) / f"q{i}{Path(index.item(item_id)['path']).suffix or '.png'}"
        path.write_bytes(index.image_bytes(item_id))
        paths.append(str(path))
    return paths, stored


def markdown(rows: list[dict]) -> str:
    out = ["| queries | micro-batching | clients | QPS | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['kind']} | {r['batching']} | {r['clients']} | {r['qps']:.1f} | {r['p50_ms']:.0f} | "
                   f"{r['p99_ms']:.0f} | {r['errors']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=Path, required=True, help="index directory with a model copy")
    p.add_argument("--images", type=Path, default=None, help="packed store or collection root of the items")
    p.add_argument("--device", default="auto")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=400, help="requests per configuration")
    p.add_argument("--time-cap", type=float, default=30.0, help="seconds per configuration at most")
    p.add_argument("--queries", type=int, default=64, help="distinct query images / ids")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--cli-runs", type=int, default=5, help="one-shot `uniret search` processes per query kind")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        paths, ids = query_sets(args)
        image_requests = [{"params": {"k": args.k}, "files": {"file": (Path(q).name, Path(q).read_bytes())}}
                          for q in paths]
        id_requests = [{"json": {"ids": [i], "k": args.k}} for i in ids]
        rows = []
        for batching, max_batch in (("on", 32), ("off", 1)):
            proc, url = start_server(args, max_batch)
            try:
                for kind, requests in (("image", image_requests), ("id", id_requests)):
                    for clients in args.clients:
                        res = asyncio.run(load(url, requests, clients, args.requests, args.time_cap))
                        rows.append({"kind": kind, "batching": batching, **res})
                        print(json.dumps(rows[-1]), flush=True)
            finally:
                stop_server(proc)
        cli = {"image": one_shot_cli(args, paths, args.cli_runs),
               "id": one_shot_cli(args, [f"id:{i}" for i in ids], args.cli_runs)}
    print(markdown(rows))
    print(f"one-shot `uniret search`: image {cli['image']['mean_s']} s/query ({cli['image']['qps']} QPS), "
          f"id {cli['id']['mean_s']} s/query ({cli['id']['qps']} QPS)")
    at8 = next((r for r in rows if r["kind"] == "image" and r["batching"] == "on" and r["clients"] == 8), None)
    summary = {"rows": rows, "cli": cli}
    if at8 is not None:
        summary["targets"] = {"image_qps_at_8_over_50": round(at8["qps"] / 50, 2),
                              "p99_ms_at_8_under_500": round(500 / max(at8["p99_ms"], 1e-9), 2),
                              "speedup_over_cli": round(at8["qps"] / cli["image"]["qps"], 1)}
        print(f"image queries at 8 clients with micro-batching: {at8['qps']} QPS ({summary['targets']['image_qps_at_8_over_50']}x "
              f"the 50 QPS target), p99 {at8['p99_ms']} ms (target 500), "
              f"{summary['targets']['speedup_over_cli']}x the one-shot CLI (target 20x)")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
