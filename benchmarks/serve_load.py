"""Load test of `uniret serve` on loopback against one-shot `uniret search` processes.

Starts the real server (``python -m uniret.cli serve``) on 127.0.0.1, once with micro-batching
(``--max-batch 32``) and once without (``--max-batch 1``), and sends a fixed number of requests
(``--requests``, stopped early at ``--time-cap`` seconds) from 1, 8 and 32 concurrent clients
(asyncio, keep-alive; pre-encoded requests on raw sockets so that the client, which shares the CPU
with the server, costs little; ``--client httpx`` for the httpx client): image queries (multipart uploads of stored images) and id queries
(JSON). It reports QPS, p50 and p99 latency, then times ``--cli-runs`` one-shot ``uniret search``
processes on the same queries. Every configuration runs once per ``--runtime`` (torch, onnx: side by
side in one run), and every row carries the load average when it was measured. Targets on a 2-core
CPU with the demo model (test_resnet at 64 px): >= 50 image queries/s at 8 clients, p99 <= 500 ms,
>= 20x the one-shot CLI throughput; with ONNX Runtime >= 400 image queries/s at 32 clients with p99
<= 500 ms, and micro-batching ahead of ``--max-batch 1`` at every client count above 1.

    uniret demo --out uniret-demo      # then index every image with the model copy:
    uniret embed --model uniret-demo/run/model --data uniret-demo/data --out store-all
    uniret index build store-all --out index-all
    python benchmarks/serve_load.py --index index-all --images uniret-demo/data
    python benchmarks/serve_load.py --index index-all --images uniret-demo/data --device cuda   # a GPU
    python benchmarks/serve_load.py --index index-all --images uniret-demo/data --kinds image --cli-runs 0
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


def start_server(args, max_batch: int, runtime: str = "auto") -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uniret.cli", "serve", str(args.index), "--port", str(port), "--device", args.device,
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--runtime", runtime]
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


def raw_request(request: dict, host: str) -> bytes:
    """The bytes of one HTTP/1.1 keep-alive POST /search for a request given as httpx arguments."""
    query = "&".join(f"{k}={v}" for k, v in (request.get("params") or {}).items())
    if "files" in request:
        name, data = request["files"]["file"]
        boundary = "uniretloadboundary7f3a"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
    else:
        body, content_type = json.dumps(request["json"]).encode(), "application/json"
    head = (f"POST /search{'?' + query if query else ''} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def raw_load(url: str, requests: list[dict], clients: int, total: int, time_cap: float) -> dict:
    """:func:`load` with pre-encoded requests on raw keep-alive sockets (asyncio streams): the client
    then costs a small fraction of what the server does, which matters when both share 2 cores."""
    host, _, port = url.removeprefix("http://").partition(":")
    payloads = [raw_request(r, f"{host}:{port}") for r in requests]
    latencies, errors, next_i = [], [0], [0]

    async def exchange(reader, writer, payload: bytes) -> int:
        writer.write(payload)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        return int(head[9:12])

    async def client_loop() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while next_i[0] < total and time.perf_counter() - start < time_cap:
                i = next_i[0]
                next_i[0] += 1
                t0 = time.perf_counter()
                status = await exchange(reader, writer, payloads[i % len(payloads)])
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors[0] += 1
        finally:
            writer.close()

    reader, writer = await asyncio.open_connection(host, int(port))
    await exchange(reader, writer, payloads[0])  # warm-up (first batch)
    writer.close()
    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return _summary(clients, latencies, errors[0], time.perf_counter() - start)


def _summary(clients: int, latencies: list[float], errors: int, wall: float) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": round(wall, 3),
            "qps": round(len(latencies) / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "loadavg": loadavg()}


async def load(url: str, requests: list[dict], clients: int, total: int, time_cap: float) -> dict:
    """``total`` requests (cycling through ``requests``) from ``clients`` concurrent clients (httpx)."""
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
    return _summary(clients, latencies, errors[0], time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def loadavg() -> str:
    """The 1-minute load average when the row was measured (the machine may be shared)."""
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "-"


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
    out = ["| runtime | queries | micro-batching | clients | QPS | p50 ms | p99 ms | server CPU ms/query | errors "
           "| load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['runtime']} | {r['kind']} | {r['batching']} | {r['clients']} | {r['qps']:.1f} | "
                   f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r.get('server_cpu_ms', '-')} | {r['errors']} "
                   f"| {r['loadavg']} |")
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
    p.add_argument("--cli-runs", type=int, default=5, help="one-shot `uniret search` processes per query kind (0: none)")
    p.add_argument("--runtime", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx", "auto"],
                   help="what runs the model in the server; each one is measured in the same run")
    p.add_argument("--kinds", nargs="+", default=["image", "id"], choices=["image", "id"], help="query kinds")
    p.add_argument("--batching", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--client", default="raw", choices=["raw", "httpx"],
                   help="raw: pre-encoded requests on keep-alive sockets (cheap); httpx: the httpx client")
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
        kinds = [(kind, {"image": image_requests, "id": id_requests}[kind]) for kind in args.kinds]
        for runtime in args.runtime:
            for batching in args.batching:
                proc, url = start_server(args, 32 if batching == "on" else 1, runtime)
                try:
                    for kind, requests in kinds:
                        for clients in args.clients:
                            run = raw_load if args.client == "raw" else load
                            cpu = cpu_seconds(proc.pid)
                            res = asyncio.run(run(url, requests, clients, args.requests, args.time_cap))
                            # The server's own CPU per query: what the serving path costs, whatever else runs.
                            res["server_cpu_ms"] = round(1000 * (cpu_seconds(proc.pid) - cpu) / max(res["requests"], 1), 2)
                            rows.append({"runtime": runtime, "kind": kind, "batching": batching, **res})
                            print(json.dumps(rows[-1]), flush=True)
                finally:
                    stop_server(proc)
        cli = {}
        if args.cli_runs:
            cli = {"image": one_shot_cli(args, paths, args.cli_runs),
                   "id": one_shot_cli(args, [f"id:{i}" for i in ids], args.cli_runs)}
    print(markdown(rows))
    if cli:
        print(f"one-shot `uniret search`: image {cli['image']['mean_s']} s/query ({cli['image']['qps']} QPS), "
              f"id {cli['id']['mean_s']} s/query ({cli['id']['qps']} QPS)")
    summary = {"rows": rows, "cli": cli}
    for runtime in args.runtime:
        image = {(r["batching"], r["clients"]): r for r in rows if r["kind"] == "image" and r["runtime"] == runtime}
        ahead = [c for (b, c) in image if b == "on" and c > 1 and ("off", c) in image]
        if ahead:
            wins = {c: round(image[("on", c)]["qps"] / image[("off", c)]["qps"], 2) for c in ahead}
            print(f"{runtime}: micro-batching over --max-batch 1 (image QPS ratio) by clients: {wins}")
            summary.setdefault("batching_gain", {})[runtime] = wins
        top = image.get(("on", 32))
        if top is not None:
            print(f"{runtime}: image queries at 32 clients with micro-batching: {top['qps']} QPS (target 400), "
                  f"p99 {top['p99_ms']} ms (target 500), load average {top['loadavg']}")
    at8 = next((r for r in rows if r["kind"] == "image" and r["batching"] == "on" and r["clients"] == 8), None)
    if at8 is not None and cli:
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
