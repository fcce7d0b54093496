"""``--where`` filters on any metadata field: ``label == 'cat'``, ``price < 20``, ``domain in ['a', 'b']``.

An expression is ``FIELD OP LITERAL`` with OP one of ``== != < <= > >= in`` (``not in`` too) and a
literal that is a string, a number, true/false/none, or (for ``in``) a list of them. It is parsed
with Python's own parser into a syntax tree that is checked node by node (a name, one comparison, a
literal): nothing is ever evaluated as code. Several expressions all have to hold (AND).

Fields are the items' metadata as the index stores them: ``path``, ``domain``, ``split``,
``class_id`` (true when any of an item's class ids matches), ``label`` and every extra field of the
records or of a ``metadata.csv`` (Parquet columns of the store). A row without the field, or whose
value cannot be compared with the literal (a text against a number), is not selected. A field that
no item has is an error that lists the fields there are.

:func:`select_rows` gives the rows of a :class:`~uniret.index.searcher.Searcher` that pass; the
searcher then searches only those (exactly when they are few, else with a Faiss ``IDSelector``), so a
filtered query returns k results whenever k items pass.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError

_OPS = {ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne), ast.Lt: ("<", operator.lt),
        ast.LtE: ("<=", operator.le), ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
        ast.In: ("in", lambda a, b: a in b), ast.NotIn: ("not in", lambda a, b: a not in b)}
_WORDS = {"true": True, "false": False, "none": None, "null": None}
_HINT = "write FIELD OP VALUE, e.g. \"label == 'cat'\", \"price < 20\" or \"domain in ['a', 'b']\""


@dataclass(frozen=True)
class Condition:
    """One parsed expression: ``field op value``."""

    field: str
    op: str
    value: Any
    text: str

    def test(self, value) -> bool:
        fn = dict(_OPS.values())[self.op]
        try:
            return bool(fn(value, self.value))
        except TypeError:  # a text compared with a number, a list with a number: not selected
            return False

    def matches(self, item: dict | None) -> bool:
        if item is None:
            return False
        if self.field == "class_id":
            return any(self.test(c) for c in item.get("class_ids") or [])
        if self.field not in item:
            return False
        return self.test(item[self.field])


def _literal(node: ast.AST, text: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
        return -node.operand.value
    if isinstance(node, ast.Name) and node.id.lower() in _WORDS:
        return _WORDS[node.id.lower()]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_literal(e, text) for e in node.elts]
    raise UsageError(f"--where {text!r}: the value must be a number, a 'quoted text', true/false/none or a list "
                     f"of them; {_HINT}")


def parse_condition(text: str) -> Condition:
    """Parse one expression (see the module docstring); a one-line :class:`UsageError` otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"--where: empty expression; {_HINT}")
    if len(text) > 2000:
        raise UsageError("--where: expression over 2000 characters")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise UsageError(f"--where {text!r}: cannot parse it; {_HINT}") from None
    if not (isinstance(tree, ast.Compare) and len(tree.ops) == 1 and isinstance(tree.left, ast.Name)):
        raise UsageError(f"--where {text!r}: expected one comparison of a field name with a value; {_HINT}")
    op_type = type(tree.ops[0])
    if op_type not in _OPS:
        raise UsageError(f"--where {text!r}: operators are == != < <= > >= in, not in")
    op = _OPS[op_type][0]
    value = _literal(tree.comparators[0], text)
    if op in ("in", "not in") and not isinstance(value, list):
        raise UsageError(f"--where {text!r}: '{op}' needs a list, e.g. label in ['cat', 'dog']")
    return Condition(tree.left.id, op, value, text)


def parse_where(where) -> list[Condition]:
    """``where``: None, one expression or a list of them (all must hold)."""
    if where is None:
        return []
    texts = [where] if isinstance(where, str) else list(where)
    return [parse_condition(t) for t in texts]


def row_items(searcher) -> tuple[list[dict | None], set[str]]:
    """Every row's metadata (row order) and the field names they have, read once per loaded version
    (a new version is a new searcher). Memory: the metadata of every item, as dicts."""
    cached = searcher.__dict__.get("_filter_items")
    if cached is None:
        items = searcher.metadata(searcher.ids)
        fields = {"class_id"}
        for item in items:
            if item:
                fields.update(item)
        cached = searcher.__dict__["_filter_items"] = (items, fields)
    return cached


def select_rows(searcher, where, rows: np.ndarray | None = None) -> np.ndarray | None:
    """Row numbers of ``searcher`` (within ``rows`` when given) whose items pass every condition of
    ``where``; ``rows`` unchanged when there is none."""
    conditions = parse_where(where)
    if not conditions:
        return rows
    items, fields = row_items(searcher)
    for c in conditions:
        if c.field not in fields:
            shown = ", ".join(sorted(fields)[:20])
            raise UsageError(f"--where {c.text!r}: no item has a field {c.field!r}; fields: {shown}")
    candidates = range(len(items)) if rows is None else rows.tolist()
    keep = [r for r in candidates if all(c.matches(items[r]) for c in conditions)]
    return np.asarray(keep, dtype=np.int64)


#: Up to this many selected rows a filtered query searches them exactly (a matrix product over the
#: selection is then cheaper than probing the index, and never misses); above, Faiss's IDSelector.
FILTER_EXACT_MAX = 50_000


def _search_params(index, selector):
    """Search parameters carrying ``selector`` for this kind of index, or None where the index kind
    takes none (then the selected rows are searched exactly)."""
    import faiss

    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(top.nprobe))
    if isinstance(top, faiss.IndexIDMap) or isinstance(top, faiss.IndexIDMap2):
        return faiss.SearchParameters(sel=selector)
    return None


def filtered_faiss_search(searcher, xq: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Search the Faiss index with only ``rows`` allowed (an ``IDSelectorBatch`` in the search
    parameters, on the CPU index: Faiss GPU indexes take no selector); queries that got fewer than
    ``min(k, len(rows))`` results (an IVF probe that missed the selected lists) are searched exactly."""
    import faiss

    from .exact import REFINE_FACTOR, rescore
    from .keys import is_lossy

    allowed = np.ascontiguousarray(searcher.ids[rows], dtype=np.int64)
    selector = faiss.IDSelectorBatch(allowed)  # referenced until the search is done
    params = _search_params(searcher.index, selector)
    if params is None:
        return searcher._exact_rows(xq, rows, k)
    lossy = is_lossy(searcher.key)
    depth = k * REFINE_FACTOR if lossy else k
    scores, ids = searcher.index.search(xq, depth, params=params)
    if lossy:
        scores, ids = rescore(xq, ids, searcher.vectors_for, k)
    else:
        scores = scores.astype(np.float32)
        scores[ids < 0] = -np.inf
        ids = ids.astype(np.int64)
    short = (ids[:, :min(k, len(rows))] < 0).any(axis=1)
    if short.any():
        scores[short], ids[short] = searcher._exact_rows(xq[short], rows, k)
    return scores, ids
