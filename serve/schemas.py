"""Typed parsing of a search request: every malformed value is a one-line 400, never a 500.

A JSON body is read by :func:`uniret.safeio.parse_json` (nesting and lone surrogates refused) and
validated by the strict pydantic model :class:`SearchBody`: ``k`` an integer (not ``true``, not
``2.5``, not ``"²"``), ``threshold`` a number (not ``true``), ``rerank`` and ``domain`` text (not
``[1]``), ``vectors`` lists of numbers (booleans refused), unknown keys refused. Query parameters
and form fields are text: :func:`params_from_text` reads them with ASCII-only patterns first
(``str.isdigit`` and ``float`` accept other scripts' digits). Ids keep their own strict parser
(:func:`uniret.index.ids.parse_ids`).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UsageError
from ..index.api import MAX_K
from ..safeio import parse_json

PARAMS = ("k", "rerank", "domain", "threshold", "where")

_INT = re.compile(r"[0-9]{1,12}")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")
#: What each parameter must be, in the words of the one-line error.
_WANT = {"k": f"k must be an integer in 1..{MAX_K}", "threshold": "threshold must be a number in [-1, 1]",
         "rerank": "rerank must be a reranker name", "domain": "domain must be a domain name",
         "where": "where: expected a condition such as \"label == 'cat'\" or a list of them",
         "vectors": "vectors: expected a list of equal-length lists of numbers",
         "ids": "ids: expected a list of integer ids"}


class SearchParams(BaseModel):
    """k, rerank, domain and threshold, typed strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    k: int = Field(10, ge=1, le=MAX_K)
    rerank: str | None = Field(None, max_length=64)
    domain: str | None = Field(None, max_length=1024)
    threshold: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False)
    # metadata conditions (uniret.index.filters), parsed and checked by the search layer
    where: str | list[str] | None = Field(None, max_length=64)


class SearchBody(SearchParams):
    """A JSON search request: stored ids and/or query vectors, and the parameters."""

    ids: list[Any] = Field(default_factory=list)  # each checked by parse_ids (its own messages)
    # NaN and infinities pass here so that the query check names them (check_finite)
    vectors: list[list[float]] | None = None


def one_line(exc: ValidationError) -> str:
    """The first problem of a validation error, as the one line a client sees."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ())]
    field = loc[0] if loc else "request"
    if first.get("type") == "extra_forbidden":
        return (f"unknown key {field!r}: expected a JSON object with ids and/or vectors and "
                f"{', '.join(PARAMS)}")
    given = first.get("input")
    shown = repr(given)[:60] if field in ("k", "threshold", "rerank", "domain") else ""
    want = _WANT.get(field, f"{'.'.join(loc)}: {first.get('msg', 'invalid')}")
    return f"{want}{', got ' + shown if shown else ''}"


def validated(model: type[BaseModel], values: dict) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise UsageError(one_line(exc)) from None


def params_from_text(values: dict[str, str]) -> dict:
    """Query-string or form values (text) as typed values; malformed text is a one-line error."""
    out: dict = {}
    for key, text in values.items():
        if key not in PARAMS:
            continue
        if not isinstance(text, str):
            raise UsageError(f"{key}: expected text, got {type(text).__name__}")
        text = text.strip()
        if text == "" and key != "k":
            continue
        if key == "where":  # repeatable: the caller collects every value
            out[key] = [text]
            continue
        if key == "k":
            if not _INT.fullmatch(text):
                raise UsageError(f"{_WANT['k']}, got {text[:40]!r}")
            out[key] = int(text)
        elif key == "threshold":
            if not _NUMBER.fullmatch(text):
                raise UsageError(f"{_WANT['threshold']}, got {text[:40]!r}")
            out[key] = float(text)
        else:
            out[key] = text
    return out


def parse_body(body: bytes) -> SearchBody:
    """A JSON search body, or a one-line :class:`UsageError` saying what is wrong with it."""
    try:
        obj = parse_json(body, "the body", "request")
    except ValueError as exc:
        reason = str(exc).split(": ", 1)[-1].split(";")[0]
        raise UsageError(f"the body is not valid JSON ({reason})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"expected a JSON object with ids and/or vectors and {', '.join(PARAMS)}")
    return validated(SearchBody, obj)
