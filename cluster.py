"""Ray, the engine that runs uniret's large steps past one machine (``--engine ray``).

``uniret embed --engine ray`` (:mod:`uniret.embed.ray_embed`) and ``uniret index build --on-disk
--engine ray`` (:mod:`uniret.index.ondisk.ray_encode`) schedule their work as Ray tasks and actors:
Ray places them on the cluster's CPUs and GPUs, retries a task whose worker process died and
restarts a dead actor. Ray is an optional extra (``pip install "uniret[ray]"``), imported only here
and only when ``--engine ray`` is asked for.

:func:`ray_session` connects: ``--ray-address auto`` to the cluster this machine belongs to
(``ray start`` ran here, or ``RAY_ADDRESS``), ``HOST:PORT`` to the head node's GCS port, and no
address to a new local Ray with ``num_cpus`` CPUs, stopped again at the end. A Ray that this process
already runs (``ray.init`` in a notebook or a test) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from collections.abc import Iterator

from .errors import UniretError, UsageError

ENGINES = ("local", "ray")
INSTALL = 'pip install "uniret[ray]"'
#: Seconds to wait for the head node's port before giving up on ``--ray-address HOST:PORT``.
CONNECT_TIMEOUT = 5.0


def need_ray():
    """The ``ray`` module, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UniretError(f"--engine ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def check_engine(engine: str, address: str | None) -> str:
    """``--engine`` and ``--ray-address`` as given -> the engine; one-line errors for what does not fit."""
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: use {' or '.join(ENGINES)}")
    if engine != "ray":
        if address is not None:
            raise UsageError("--ray-address goes with --engine ray")
        return engine
    need_ray()
    where = parse_address(address)
    if isinstance(where, tuple):
        _reachable(*where)  # before any image or weight is read
    return engine


def parse_address(address: str | None) -> tuple[str, int] | str | None:
    """None (a local Ray), ``"auto"``, or ``(host, port)`` for ``HOST:PORT``."""
    if address is None or address.strip() == "auto":
        return None if address is None else "auto"
    m = re.fullmatch(r"\s*(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})\s*", address)
    if not m or not 0 < int(m.group(2)) < 65_536:
        raise UsageError(f"--ray-address {address!r}: write auto or HOST:PORT (the head node's port, 6379 "
                         "unless `ray start --head --port` said otherwise)")
    return m.group(1).strip("[]"), int(m.group(2))


def _reachable(host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UniretError(f"--ray-address {host}:{port}: no Ray head node answers there ({reason}); start one "
                          "with `ray start --head --port PORT`, or leave --ray-address out for a local Ray") from None


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator:
    """Ray, connected as :func:`parse_address` says; yields the ``ray`` module. A Ray this process
    already runs is used and left running; one started or joined here is shut down at the end."""
    ray = need_ray()
    where = parse_address(address)
    if isinstance(where, tuple):
        _reachable(*where)  # a wrong address is one line now, not a connection attempt that hangs
    if ray.is_initialized():
        quiet_data(ray)
        yield ray
        return
    if isinstance(where, tuple):
        kwargs = {"address": f"{where[0]}:{where[1]}"}
    elif where == "auto":
        kwargs = {"address": "auto"}
    else:
        kwargs = {"address": "local", "num_cpus": num_cpus, "include_dashboard": False}
    try:
        ray.init(**kwargs, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        what = f"the Ray cluster at {address}" if address else "a local Ray"
        raise UniretError(f"cannot connect to {what} ({_last_line(exc)}); check --ray-address "
                          "(auto needs `ray start` on this machine)") from None
    try:
        quiet_data(ray)
        yield ray
    finally:
        ray.shutdown()


def quiet_data(ray) -> None:
    """Ray Data's progress bars and plan printing off: uniret's own progress goes to stderr."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
