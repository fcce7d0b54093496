"""uniret.serve: the search layer as an HTTP service (FastAPI + uvicorn) with a web page.

``uniret serve INDEX`` (:mod:`uniret.serve.commands`) opens the index once through
:func:`uniret.open_index` and serves it with :func:`create_app` (:mod:`uniret.serve.app`):
``POST /search``, ``GET /items/{id}``, ``/items/{id}/image``, ``/healthz``, ``/info``, ``/metrics``
and the page at ``/`` (``serve/static/``, no CDN). Concurrent queries are gathered into one embed +
search per batch (:mod:`uniret.serve.batcher`); a new index version published by ``uniret index
add/remove`` is picked up without a restart. The server only reads the index.
"""

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):
    # FastAPI loads on first use, so that `uniret --help` (which imports serve/commands.py) stays fast.
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
