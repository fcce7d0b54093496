"""Item metadata of a store part as Parquet (pyarrow): fixed columns plus the items' extra fields.

Columns: ``id`` (int64, the global id), ``path``, ``domain``, ``split`` (string, null when
unknown), ``position`` (int64), ``class_ids`` (list<int64>), then one column per extra field in
first-seen order. An extra column is int64, float64, bool or string when every non-null value has
that type, otherwise (lists, objects, mixed types) JSON text, named in the schema metadata
``uniret.json_columns`` and decoded on reading. A null cell means the item has no such field.

Parts are written in row groups of :data:`ROW_GROUP` rows and read back batch by batch
(:func:`iter_items`), so neither side holds a huge part's metadata as Python objects at once
beyond the items list it was given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ...data.collection import Item
from ...errors import UniretError
from ...safeio import parse_json

FIXED = ("id", "path", "domain", "split", "position", "class_ids")
ROW_GROUP = 65_536
JSON_COLUMNS = b"uniret.json_columns"
_FIXED_TYPES = [pa.int64(), pa.string(), pa.string(), pa.string(), pa.int64(), pa.list_(pa.int64())]


def _column_type(values: set[type]) -> pa.DataType | None:
    """The Arrow type of an extra column from the Python types of its non-null values (None = JSON)."""
    for py, arrow in ((str, pa.string()), (bool, pa.bool_()), (int, pa.int64()), (float, pa.float64())):
        if values <= {py}:
            return arrow
    return None


def schema_of(items: Sequence[Item]) -> pa.Schema:
    """The part's schema: the fixed columns and every extra field the items carry."""
    kinds: dict[str, set[type]] = {}
    for it in items:
        for key, value in it.extra.items():
            kinds.setdefault(key, set())
            if value is not None:
                kinds[key].add(type(value))
    fields = [pa.field(n, t) for n, t in zip(FIXED, _FIXED_TYPES)]
    as_json = []
    for key, types in kinds.items():
        arrow = _column_type(types)
        if arrow == pa.int64() and any(abs(it.extra.get(key) or 0) >= 1 << 63 for it in items):
            arrow = None  # Python ints beyond int64 stay exact as JSON text
        fields.append(pa.field(key, arrow or pa.string()))
        if arrow is None:
            as_json.append(key)
    return pa.schema(fields, metadata={JSON_COLUMNS: json.dumps(as_json).encode()})


def write_metadata(path: str | Path, items: Sequence[Item], start: int) -> list[str]:
    """Write ``items`` (ids ``start ..``) to ``path``; returns the extra column names."""
    schema = schema_of(items)
    extras = schema.names[len(FIXED):]
    as_json = set(json.loads(schema.metadata[JSON_COLUMNS]))
    with pq.ParquetWriter(str(path), schema) as writer:
        for a in range(0, max(len(items), 1), ROW_GROUP):
            chunk = items[a:a + ROW_GROUP]
            columns = [
                list(range(start + a, start + a + len(chunk))),
                [it.path for it in chunk],
                [it.domain for it in chunk],
                [it.split for it in chunk],
                [it.position for it in chunk],
                [list(it.class_ids) for it in chunk],
            ]
            for key in extras:
                values = [it.extra.get(key) for it in chunk]
                if key in as_json:
                    values = [None if v is None else json.dumps(v, sort_keys=True) for v in values]
                columns.append(values)
            writer.write_table(pa.Table.from_arrays([pa.array(c, type=t) for c, t in zip(columns, schema.types)],
                                                    schema=schema))
    return list(extras)


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(str(path))
    except FileNotFoundError:
        raise UniretError(f"{path}: missing part file; the store is incomplete, re-embed or re-merge it") from None
    except (OSError, pa.ArrowException) as exc:
        raise UniretError(f"{path}: unreadable metadata ({exc}); re-embed this part") from None


def iter_items(path: str | Path, start: int, count: int, batch_rows: int = ROW_GROUP) -> Iterator[tuple[int, Item]]:
    """(id, Item) of every row of a part, in id order, a batch at a time; checks that the ids are
    ``start .. start + count - 1``."""
    pf = _open(Path(path))
    expected = start
    try:
        as_json = set(parse_json((pf.schema_arrow.metadata or {}).get(JSON_COLUMNS, b"[]"), path))
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                if row["id"] != expected or not isinstance(row["path"], str):
                    raise UniretError(f"{path}: row of id {row['id']} where id {expected} belongs; the part is "
                                      "damaged, re-embed it")
                extra = {key: parse_json(value, path) if key in as_json else value
                         for key, value in row.items() if key not in FIXED and value is not None}
                yield expected, Item(row["path"], row["domain"], row["split"], int(row["position"]),
                                     tuple(int(c) for c in row["class_ids"] or ()), extra)
                expected += 1
    except (KeyError, TypeError, ValueError, OSError, pa.ArrowException) as exc:  # missing columns, bad values
        raise UniretError(f"{path}: damaged metadata ({type(exc).__name__}: {' '.join(str(exc).split())[:100]}); "
                          "re-embed this part") from None
    if expected != start + count:
        raise UniretError(f"{path}: metadata has {expected - start} rows, the part holds {count}; re-embed this part")


def column_names(path: str | Path) -> list[str]:
    """The extra column names of a part (reads the schema only)."""
    return [n for n in _open(Path(path)).schema_arrow.names if n not in FIXED]
