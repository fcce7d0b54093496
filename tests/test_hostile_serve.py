"""Hostile clients of `uniret serve` (issue #21): the real app over loopback, and the real command.

- Host header: a loopback server answers only loopback names (DNS rebinding), others with
  ``--allowed-host``;
- typed request parsing: every malformed value (``k`` = "²", ``rerank: [1]``, booleans as numbers,
  100k-deep JSON, lone surrogates, other scripts' digits) is a one-line 400, never a 500;
- a client that stops sending its body gets 408; startup failures (port in use, bad host, a token no
  client can send) are one ``error:`` line before any banner;
- slow clients: with a low descriptor limit, many half-sent requests do not stop ``/healthz``
  answering within a second, and the server's log stays short.

The index is never written (hashed before and after).
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from servers import LiveServer
from test_hostile import _child_env, one_line, snapshot

import uniret
from uniret.cli import main
from uniret.serve import ServeSettings, create_app


@pytest.fixture(scope="module")
def live(image_index):
    index = uniret.open_index(image_index / "index")
    before = snapshot(image_index / "index")
    with LiveServer(create_app(index, ServeSettings(body_timeout=1.0))) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, url
    assert snapshot(image_index / "index") == before


def raw_request(url: str, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` as is on a new connection; everything the server answers until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"content-length" in b"".join(chunks).lower():
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                if len(body) >= length:
                    break
    return b"".join(chunks)


def assert_one_line_error(response: httpx.Response, status: int, match: str | None = None) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert "\n" not in error and "Traceback" not in error, error
    if match:
        assert match.lower() in error.lower(), error
    return error


# -- the Host header --------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.nip.io", "localhost.evil.example",
                                  "0.0.0.0", "[::2]", "LOCALHOST.", "127.0.0.1 x", ""])
def test_foreign_host_headers_are_refused_on_loopback(live, host):
    client, _ = live
    for path in ("/info", "/items/0", "/items/0/image", "/", "/openapi.json"):
        error = assert_one_line_error(client.get(path, headers={"host": host}), 400)
        assert "--allowed-host" in error


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LocalHost:8000", "[::1]:1234", "127.0.0.1:1"])
def test_loopback_host_names_are_answered(live, host):
    client, _ = live
    assert client.get("/healthz", headers={"host": host}).status_code == 200


def test_a_request_without_a_host_header_is_refused(live):
    _, url = live
    answer = raw_request(url, b"GET /info HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"not a name this server answers to" in answer


def test_allowed_hosts():
    from uniret.errors import UsageError
    from uniret.serve.guards import allowed_hosts

    assert allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "[::1]")
    assert "search.example.org" in allowed_hosts("127.0.0.1", ["Search.Example.org"])
    assert allowed_hosts("::1") == ("127.0.0.1", "localhost", "[::1]")
    assert allowed_hosts("0.0.0.0") == ("*",) and allowed_hosts("0.0.0.0", ["a.org"]) == ("a.org",)
    for bad in ["a*.org", "*org", "http://a.org/", ""]:
        with pytest.raises(UsageError):
            allowed_hosts("127.0.0.1", [bad])


def test_an_allowed_host_is_answered(image_index):
    index = uniret.open_index(image_index / "index")
    with LiveServer(create_app(index, ServeSettings(allowed_hosts=("127.0.0.1", "*.example.org")))) as url:
        assert httpx.get(f"{url}/info", headers={"host": "a.example.org"}).status_code == 200
        assert httpx.get(f"{url}/info", headers={"host": "example.org.evil"}).status_code == 400


# -- typed request parsing ----------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
MALFORMED = {  # name: (request keyword arguments, what the one line must say)
    "k superscript two": (dict(json={"ids": [1], "k": "²"}), "k must be"),
    "k superscript in query": (dict(params={"k": "²"}, json={"ids": [1]}), "k must be"),
    "k arabic digits in query": (dict(params={"k": "١٠"}, json={"ids": [1]}), "k must be"),
    "k fullwidth in form": (dict(data={"k": "１", "ids": "1"}, files={"file": ("a.png", b"x")}), "k must be"),
    "k true": (dict(json={"ids": [1], "k": True}), "k must be"),
    "k list": (dict(json={"ids": [1], "k": [3]}), "k must be"),
    "k exponent text": (dict(params={"k": "1e3"}, json={"ids": [1]}), "k must be"),
    "k underscore": (dict(params={"k": "1_0"}, json={"ids": [1]}), "k must be"),
    "k negative": (dict(params={"k": "-3"}, json={"ids": [1]}), "k must be"),
    "rerank list": (dict(json={"ids": [1], "rerank": [1]}), "rerank must be"),
    "rerank object": (dict(json={"ids": [1], "rerank": {"a": 1}}), "rerank must be"),
    "domain list": (dict(json={"ids": [1], "domain": ["flags"]}), "domain must be"),
    "domain number": (dict(json={"ids": [1], "domain": 3}), "domain must be"),
    "threshold true": (dict(json={"ids": [1], "threshold": True}), "threshold must be"),
    "threshold infinity": (dict(content=b'{"ids": [1], "threshold": Infinity}',
                                headers={"content-type": "application/json"}), "threshold must be"),
    "threshold arabic digits": (dict(params={"threshold": "٠.٥"}, json={"ids": [1]}), "threshold must be"),
    "threshold nan text": (dict(params={"threshold": "nan"}, json={"ids": [1]}), "threshold must be"),
    "threshold out of range": (dict(params={"threshold": "2"}, json={"ids": [1]}), "threshold must be"),
    "vectors of booleans": (dict(json={"vectors": [[True] * 16]}), "vectors"),
    "vectors flat": (dict(json={"vectors": [0.5] * 16}), "vectors"),
    "vectors object": (dict(json={"vectors": {"a": 1}}), "vectors"),
    "ids object": (dict(json={"ids": {"a": 1}}), "ids"),
    "ids nested": (dict(json={"ids": [[1]]}), "id"),
    "ids huge": (dict(json={"ids": [2**70]}), "ids are integers"),
    "deep array": (dict(content=DEEP, headers={"content-type": "application/json"}), "nested deeper"),
    "deep ids": (dict(content=b'{"ids": ' + DEEP[:5000] + DEEP[-5000:] + b"}",
                      headers={"content-type": "application/json"}), "nested deeper"),
    "lone surrogate": (dict(content=b'{"ids": [1], "domain": "\\ud800"}',
                            headers={"content-type": "application/json"}), "surrogate"),
    "invalid utf-8": (dict(content=b'{"ids": [1], "domain": "\xff"}',
                           headers={"content-type": "application/json"}), "not valid JSON"),
    "top-level list": (dict(json=[1, 2]), "JSON object"),
    "top-level string": (dict(json="ids"), "JSON object"),
    "unknown key": (dict(json={"ids": [1], "__proto__": 1}), "unknown key"),
    "k overflowing float": (dict(content=b'{"ids": [1], "k": 1e400}', headers={"content-type": "application/json"}),
                            "k must be"),
    "infinite vector": (dict(content=b'{"vectors": [[1e400' + b", 1" * 15 + b"]]}",
                             headers={"content-type": "application/json"}), "infinite"),
    "too many form fields": (dict(data={f"x{i}": "1" for i in range(100)}, files={"file": ("a.png", b"x")}),
                             "field"),
    "unknown form field": (dict(data={"kk": "1"}, files={"file": ("a.png", b"x")}), "unknown form field"),
}


@pytest.mark.parametrize("path", ["/items/١", "/items/%C2%B2", "/items/1e3", "/items/0x10", "/items/%00",
                                  "/items/" + "9" * 40, "/items/1%0A2/image"])
def test_malformed_item_ids_are_one_line_400(live, path):
    client, _ = live
    assert_one_line_error(client.get(path), 400)


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_values_are_one_line_400(live, name):
    client, _ = live
    kwargs, match = MALFORMED[name]
    assert_one_line_error(client.post("/search", **kwargs), 400, match)


def test_good_values_still_work(live):
    client, _ = live
    r = client.post("/search", params={"k": " 3 ", "threshold": "-1"}, json={"ids": [1]})
    assert r.status_code == 200 and len(r.json()["results"][0]["results"]) == 3
    r = client.post("/search", json={"vectors": [[1] * 16], "k": 2, "threshold": -1})  # ints are numbers
    assert r.status_code == 200 and r.json()["threshold"] == -1.0


def test_a_stalled_body_is_408_and_the_server_goes_on(live):
    client, url = live
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"ids\": [")
    started = time.monotonic()
    answer = raw_request(url, head)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"stopped arriving" in answer and time.monotonic() - started < 8
    assert client.get("/healthz").status_code == 200


# -- startup failures --------------------------------------------------------------------------------

def _serve_refused(capsys, argv, code, match):
    capsys.readouterr()
    assert main(argv) == code, argv
    err = capsys.readouterr().err
    lines = one_line(err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "uniret serve:" not in err  # no banner before the error
    assert match in lines[0], lines[0]


def test_startup_failures_are_one_line_before_any_banner(image_index, capsys, monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.delenv("UNIRET_TOKEN", raising=False)
    idx = str(image_index / "index")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        _serve_refused(capsys, ["serve", idx, "--port", port], 1, "in use")
    for host in ["999.1.1.1", "no-such-host.invalid", "10.255.255.254", "::g"]:
        _serve_refused(capsys, ["serve", idx, "--host", host], 2, "--host")
    for token in ["tök", "two words", "tab\there", "\x1b[2J", "x" * 600]:
        _serve_refused(capsys, ["serve", idx, "--token", token], 2, "visible ASCII")
    _serve_refused(capsys, ["serve", idx, "--allowed-host", "http://evil/"], 2, "--allowed-host")
    assert not calls


def test_a_token_no_client_can_send_is_refused_by_the_app(image_index):
    from uniret.errors import UsageError

    with pytest.raises(UsageError, match="visible ASCII"):
        create_app(uniret.open_index(image_index / "index"), ServeSettings(token="pässword"))


def test_a_non_ascii_bearer_is_401_not_500(image_index):
    index = uniret.open_index(image_index / "index")
    with LiveServer(create_app(index, ServeSettings(token="s3cret"))) as url:
        r = httpx.get(f"{url}/info", headers={"authorization": "Bearer s3crét".encode()})
        assert r.status_code == 401 and "token" in r.json()["error"]
        r = httpx.get(f"{url}/info", headers={"authorization": b"Bearer \xff\xfe"})
        assert r.status_code == 401


# -- slow clients and a short log ------------------------------------------------------------------------

def test_exhausted_descriptors_and_bad_requests_log_one_line(caplog):
    import asyncio
    import errno
    import logging

    from uniret.serve.connections import OncePerInterval, quiet_server_logs

    loop = asyncio.new_event_loop()
    try:
        quiet_server_logs(loop)
        with caplog.at_level(logging.WARNING):
            for _ in range(1000):  # what asyncio reports for each failed accept() retry
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(errno.EMFILE, "Too many open files")})
        lines = [r for r in caplog.records if "file descriptors" in r.getMessage()]
        assert len(lines) == 1 and "ulimit -n" in lines[0].getMessage()
    finally:
        loop.close()
    keep = OncePerInterval(every=60)
    record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Invalid HTTP request received.",
                               None, None)
    other = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Exceeded concurrency limit.",
                              None, None)
    assert [keep.filter(record) for _ in range(500)].count(True) == 1 and keep.filter(other)


def test_accept_retry_after_shutdown_is_not_a_traceback(caplog):
    """asyncio answers a failed accept() (EMFILE) by retrying a second later; when the server shuts down in
    that second the retry finds the listening socket closed (descriptor -1). That is not an error."""
    import asyncio
    import logging

    from uniret.serve.connections import quiet_server_logs

    async def main() -> None:
        loop = asyncio.get_running_loop()
        quiet_server_logs(loop)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = await loop.create_server(asyncio.Protocol, sock=sock)
        server.close()  # closes the socket, as uvicorn does at shutdown
        await server.wait_closed()
        # exactly what BaseSelectorEventLoop._accept_connection schedules after an EMFILE
        loop.call_soon(loop._start_serving, asyncio.Protocol, sock, None, server, 100)
        await asyncio.sleep(0.05)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    assert any("accept retry after shutdown" in r.getMessage() for r in caplog.records)


def test_garbage_requests_do_not_fill_the_log(live):
    import logging

    _, url = live
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("uvicorn.error")  # uvicorn's own logger (it does not propagate to the root)
    log.addHandler(handler)
    try:
        for _ in range(100):
            answer = raw_request(url, b"\x16\x03\x01 not http at all\r\n\r\n", timeout=5)
            assert answer.startswith(b"HTTP/1.1 400") or answer == b""
    finally:
        log.removeHandler(handler)
    assert 1 <= len(seen) <= 2, seen[:5]


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_half_sent_requests_do_not_starve_healthz(image_index, tmp_path):
    """The real `uniret serve` under a 256-descriptor limit, held by 600 half-sent requests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "serve.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "uniret.cli", "serve", str(image_index / "index"), "--port",
                               str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                              env=_child_env(), preexec_fn=_low_fd_limit)
    url = f"http://127.0.0.1:{port}"
    held = []
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.2)
        for _ in range(600):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never finished
            held.append(sock)
        time.sleep(1.0)
        times = []
        for _ in range(5):
            started = time.monotonic()
            r = httpx.get(f"{url}/healthz", timeout=5)
            times.append(time.monotonic() - started)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        times.sort()
        print(f"/healthz of 5 with 600 half-sent requests held, 256 descriptors: median {times[2] * 1000:.0f} ms, "
              f"slowest {times[-1] * 1000:.0f} ms")
        # Without the fix /healthz never answers (timeout); with it, 80 ms when the CPU is quiet. The median
        # must be within a second, so that one request slowed by other work on a shared CPU is not a failure.
        assert times[2] < 1.0, f"/healthz took {times[2]:.2f} s (median of 5) while 600 requests were held"
    finally:
        for sock in held:
            sock.close()
        server.terminate()
        server.wait(timeout=30)
    text = Path(log.name).read_text()
    assert "Traceback" not in text and len(text.splitlines()) < 10, text[-3000:]
