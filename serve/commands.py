"""CLI: ``uniret serve INDEX``: the search layer over HTTP, with the web page at ``/``.

Every startup failure (a bad option, a token no client can send, a host that is not an address of
this machine, a port in use) is one ``error:`` line before the banner: the address is bound once
here, before the index is opened, so uvicorn never reports it after "serving on".
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

import typer

from ..display import printable
from ..errors import UniretError, UsageError

logger = logging.getLogger("uniret")


def serve_command(
    index: Path = typer.Argument(..., help="Index directory (served read-only)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --token."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    images: Path = typer.Option(None, "--images", help="Packed store, collection root or image folder of the "
                                                       "indexed items (thumbnails and /items/ID/image)."),
    device: str = typer.Option("auto", "--device", help="Where query images are embedded: auto, cpu, cuda or cuda:N."),
    runtime: str = typer.Option("auto", "--runtime", help="What runs the model: torch, onnx (ONNX Runtime) or auto "
                                "(ONNX Runtime on a CPU when installed and the index's model copy keeps its graph)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Queries gathered into one embed + search (1: no batching)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long a batch waits to fill, in milliseconds."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body, in MB (bigger: HTTP 413)."),
    token: str = typer.Option(None, "--token", envvar="UNIRET_TOKEN", show_envvar=True,
                              help="Require this bearer token on every endpoint but /healthz."),
    allowed_host: list[str] = typer.Option(None, "--allowed-host", help="Also answer requests whose Host header is "
                                           "this name (repeatable; *.example.org for subdomains). A loopback bind "
                                           "answers only loopback names without it."),
) -> None:
    """Serve an index over HTTP: POST /search, GET /items/ID, /healthz, /info, /metrics, the page at /."""
    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    if not 1 <= max_batch <= 1024:
        raise UsageError(f"--max-batch must be in 1..1024, got {max_batch}")
    if not 0 <= max_wait_ms <= 1000:
        raise UsageError(f"--max-wait-ms must be in 0..1000, got {max_wait_ms}")
    if not 0 < max_upload_mb <= 1024:
        raise UsageError(f"--max-upload-mb must be in (0, 1024], got {max_upload_mb}")
    if token is not None and not token.strip():
        raise UsageError("--token is empty; give a token or leave the option out")
    import uvicorn

    from ..index.api import open_index
    from .app import ServeSettings, create_app
    from .connections import connection_cap, guarded_h11
    from .guards import allowed_hosts, check_token, is_loopback

    check_token(token)
    if not is_loopback(host) and not token:
        raise UsageError(f"--host {host} without --token: anyone who can reach this address could search the index "
                         "and read its images; set --token (or UNIRET_TOKEN), or serve on 127.0.0.1")
    hosts = allowed_hosts(host, allowed_host or [])
    check_listen(host, port)
    opened = open_index(index, device=device, images=images, runtime=runtime)
    if opened.searcher.manifest.get("model_dir") or opened.model_dir:
        opened.load_model()  # load the model now, not on the first image query
        logger.info("image queries: %s on %s", opened.runtime, opened.device)
    opened.domains()
    if opened.images is None:
        logger.info("no --images and no image folder recorded in the index: results show no pictures; "
                    "pass --images DATA (a packed store or folder)")
    app = create_app(opened, ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms,
                                           max_upload_mb=max_upload_mb, token=token, allowed_hosts=hosts))
    cap = connection_cap()
    shown = f"[{host}]" if ":" in host else host
    typer.echo(printable(f"uniret serve: {index} ({opened.count} items, {opened.version}) on http://{shown}:{port}/"
                         f"{'?token=<token>' if token else ''}  (API docs: /docs; Ctrl-C stops)"), err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, http=guarded_h11(HEAD_TIMEOUT, cap),
                timeout_keep_alive=KEEP_ALIVE_TIMEOUT, limit_concurrency=cap + 1)


#: Seconds a client has to send a complete request head; seconds an idle keep-alive connection stays.
HEAD_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 5


def check_listen(host: str, port: int) -> None:
    """Bind ``host:port`` once (and let go) so that a bad host or a port in use is one line now."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {host!r}: not an address or name this machine can listen on "
                         f"({getattr(exc, 'strerror', None) or exc}); use 127.0.0.1, 0.0.0.0 or one of its addresses") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UniretError(f"cannot listen on {host}:{port}: the port is in use (another server?); stop it or "
                                  "choose another --port") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise UniretError(f"cannot listen on {host}:{port}: permission denied (ports below 1024 need root); "
                                  "choose a --port from 1024 up") from None
            raise UsageError(f"--host {host!r}: cannot listen there ({exc.strerror or exc}); use 127.0.0.1, 0.0.0.0 "
                             "or an address of this machine") from None
