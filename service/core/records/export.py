"""Exports of records as CSV or Parquet, produced a page at a time so any number streams in bounded memory.

Each function takes an iterator of records (the store's keyset pages) and yields bytes: CSV a page of rows at a
time, Parquet one row group per page (pyarrow's writer into a sink that hands its bytes on as they come). Text a
client sent (part_id, station, tags, filename, a review's note) may start with `=`, `+`, `-` or `@`, which a
spreadsheet would run as a formula: such cells get a leading `'` in CSV (OWASP's advice); Parquet keeps text as it
is (it is typed data, not a sheet).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from .record import Record

__all__ = ["EXPORT_COLUMNS", "csv_chunks", "parquet_chunks"]

EXPORT_COLUMNS = ("id", "time", "class_name", "revision", "model", "threshold", "threshold_per_request", "score",
                  "normalized_score", "text_score", "is_anomalous", "verdict", "filename", "width", "height",
                  "regions", "part_id", "station", "tags", "image_kept", "review", "review_note", "reviewed_by",
                  "reviewed_at")
_TEXT = ("filename", "part_id", "station", "tags", "review_note", "reviewed_by")
PAGE = 2000


def _values(r: Record) -> dict[str, Any]:
    return {"id": r.id, "time": r.time, "class_name": r.class_name, "revision": r.revision, "model": r.model,
            "threshold": r.threshold, "threshold_per_request": r.threshold_per_request, "score": r.score,
            "normalized_score": r.normalized_score, "text_score": r.text_score, "is_anomalous": r.is_anomalous,
            "verdict": r.verdict, "filename": r.filename, "width": r.width, "height": r.height,
            "regions": json.dumps(r.regions, separators=(",", ":")), "part_id": r.part_id, "station": r.station,
            "tags": ",".join(r.tags), "image_kept": r.image_sha256 is not None, "review": r.review,
            "review_note": r.review_note, "reviewed_by": r.reviewed_by, "reviewed_at": r.reviewed_at}


def _pages(records: Iterable[Record]) -> Iterator[list[Record]]:
    it = iter(records)
    while page := list(islice(it, PAGE)):
        yield page


def _inert(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def csv_chunks(records: Iterable[Record]) -> Iterator[bytes]:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(EXPORT_COLUMNS)
    for page in _pages(records):
        for r in page:
            v = _values(r)
            for k in _TEXT:
                v[k] = _inert(v[k])
            writer.writerow([v[c] for c in EXPORT_COLUMNS])
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()
    if buf.tell():
        yield buf.getvalue().encode()


class _Sink:
    """A write-only file for pyarrow's writer whose bytes are taken as they come (`take`)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0
        self.closed = False

    def write(self, data: Any) -> int:
        b = bytes(data)
        self._parts.append(b)
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


def parquet_chunks(records: Iterable[Record]) -> Iterator[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("id", pa.string()), ("time", pa.float64()), ("class_name", pa.string()), ("revision", pa.string()),
        ("model", pa.string()), ("threshold", pa.float64()), ("threshold_per_request", pa.bool_()),
        ("score", pa.float64()), ("normalized_score", pa.float64()), ("text_score", pa.float64()),
        ("is_anomalous", pa.bool_()), ("verdict", pa.string()), ("filename", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()), ("regions", pa.string()), ("part_id", pa.string()), ("station", pa.string()),
        ("tags", pa.string()), ("image_kept", pa.bool_()), ("review", pa.string()), ("review_note", pa.string()),
        ("reviewed_by", pa.string()), ("reviewed_at", pa.float64())])
    sink = _Sink()
    writer = pq.ParquetWriter(sink, schema, compression="zstd")
    for page in _pages(records):
        rows = [_values(r) for r in page]
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))  # one row group per page
        if chunk := sink.take():
            yield chunk
    writer.close()
    yield sink.take()
