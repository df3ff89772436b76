"""Inspection records: query them, one by id with its image and thumbnail, export, review, and a reviewed good
part as a shot in one call. The records live where the model is (service/core/records/): an engine route."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import StreamingResponse

from ...core.access.audit import AuditEvent
from ...core.access.roles import Principal, Role
from ...core.class_names import CLASS_NAME
from ...core.errors import ForbiddenError, RecordNotFoundError, UnprocessableError
from ...core.records.export import csv_chunks, parquet_chunks
from ...core.records.record import MAX_TAG, MAX_TEXT, Record
from ...core.records.recorder import Recorder
from ...core.records.store import RecordQuery
from ..auth import PrincipalDep, Requires
from ..deps import LocalDep, RecordsDep, RegistryDep
from ..query_params import only_params
from ..schemas import FromResultsResponse, RecordList, RecordOut, ReviewRequest
from .shots import shots_from_records

__all__ = ["router"]

router = APIRouter(prefix="/records", tags=["records"], dependencies=[Depends(Requires(Role.INSPECT))])

_ID = r"^[0-9a-f]{32}$"
RecordId = Annotated[str, Path(pattern=_ID, description="a record's id: 32 hex digits")]


def _filters(
    class_name: Annotated[str | None, Query(pattern=CLASS_NAME.pattern, description="one class")] = None,
    since: Annotated[float | None, Query(ge=0, description="scored at or after (Unix seconds)")] = None,
    until: Annotated[float | None, Query(ge=0, description="scored before (Unix seconds)")] = None,
    verdict: Annotated[Literal["pass", "fail"] | None, Query(description="pass or fail")] = None,
    part_id: Annotated[str | None, Query(max_length=MAX_TEXT, description="the client's part id")] = None,
    station: Annotated[str | None, Query(max_length=MAX_TEXT)] = None,
    tag: Annotated[str | None, Query(max_length=MAX_TAG, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/@+=-]*$",
                                     description="records carrying this tag")] = None,
    reviewed: Annotated[bool | None, Query(description="reviewed (true) or not yet (false)")] = None,
    review: Annotated[Literal["good", "defective"] | None, Query(description="reviewed as")] = None,
) -> RecordQuery:
    return RecordQuery(class_name=class_name, since=since, until=until, verdict=verdict, part_id=part_id,
                       station=station, tag=tag, reviewed=reviewed, review=review)


Filters = Annotated[RecordQuery, Depends(_filters)]
_FILTERS = ("class_name", "since", "until", "verdict", "part_id", "station", "tag", "reviewed", "review")



def _scoped(q: RecordQuery, principal: Principal) -> RecordQuery:
    """A key limited to some classes: 403 for a class outside them (records of the others are left out of the
    answers, `_touchable`)."""
    if q.class_name is not None and not principal.may_touch(q.class_name):
        raise ForbiddenError(f"key '{principal.name}' may not touch class '{q.class_name}'")
    return q


def _touchable(rows: Iterable[Record], principal: Principal) -> Iterator[Record]:
    return (r for r in rows if principal.classes is None or principal.may_touch(r.class_name))


def _visible(records: Recorder, record_id: str, principal: Principal) -> Record:
    r = records.get(record_id)
    if not principal.may_touch(r.class_name):
        raise RecordNotFoundError(f"no record '{record_id[:40]}' of a class this key may touch")
    return r


@router.get("", response_model=RecordList, summary="Records, newest first, filtered, a page at a time",
            dependencies=[only_params(*_FILTERS, "before", "limit")])
async def list_records(
    q: Filters, records: RecordsDep, principal: PrincipalDep,
    before: Annotated[str | None, Query(pattern=_ID, description="the previous page's `next`")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="records per page")] = 100,
) -> dict:
    """Keyset pagination: pass `next` as `before` for the next page; records added meanwhile never shift a page."""
    from dataclasses import replace

    query = replace(_scoped(q, principal), before=before, limit=limit)
    rows = await asyncio.to_thread(records.query, query)
    return {"records": [r.summary() for r in _touchable(rows, principal)],
            "next": rows[-1].id if len(rows) == limit else None}


@router.get("/export", summary="Every matching record as CSV or Parquet, streamed",
            response_class=StreamingResponse, dependencies=[only_params(*_FILTERS, "format")],
            responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
async def export_records(
    q: Filters, records: RecordsDep, principal: PrincipalDep,
    format: Annotated[Literal["csv", "parquet"], Query(description="csv or parquet")] = "csv",
) -> StreamingResponse:
    """Newest first, read and written a page at a time (bounded memory whatever the count). CSV cells a
    spreadsheet would run as formulas start with `'`."""
    query = _scoped(q, principal)
    rows = _touchable(records.iter_records(query, 2000), principal)
    chunks = csv_chunks(rows) if format == "csv" else parquet_chunks(rows)
    media = "text/csv; charset=utf-8" if format == "csv" else "application/vnd.apache.parquet"
    return StreamingResponse(chunks, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="records.{format}"'})


@router.get("/{record_id}", response_model=RecordOut, summary="One record")
async def one_record(record_id: RecordId, records: RecordsDep, principal: PrincipalDep) -> dict:
    return (await asyncio.to_thread(_visible, records, record_id, principal)).summary()


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"BM", "image/bmp"),
          (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"), (b"GIF8", "image/gif"))


def _media_type(data: bytes) -> str:
    """The upload's type by its first bytes (never the client's word); unknown: a download, never rendered."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((t for magic, t in _MAGIC if data.startswith(magic)), "application/octet-stream")


@router.get("/{record_id}/image", summary="The upload as sent, when kept", response_class=Response,
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "application/octet-stream": {}}}})
async def record_image(record_id: RecordId, records: RecordsDep, principal: PrincipalDep) -> Response:
    def read() -> bytes:
        _visible(records, record_id, principal)
        data = records.image(record_id)
        if data is None:
            raise RecordNotFoundError(f"record '{record_id[:40]}' has no kept image (not sampled, or removed by "
                                      "retention)")
        return data

    data = await asyncio.to_thread(read)
    media = _media_type(data)
    headers = {"Content-Disposition": "attachment"} if media == "application/octet-stream" else {}
    return Response(data, media_type=media, headers=headers)


@router.get("/{record_id}/thumbnail", summary="The heatmap thumbnail (JPEG), when kept", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}})
async def record_thumbnail(record_id: RecordId, records: RecordsDep, principal: PrincipalDep) -> Response:
    def read() -> bytes:
        _visible(records, record_id, principal)
        data = records.image(record_id, thumbnail=True)
        if data is None:
            raise RecordNotFoundError(f"record '{record_id[:40]}' has no kept thumbnail")
        return data

    return Response(await asyncio.to_thread(read), media_type="image/jpeg")


def _review(records: Recorder, local: LocalDep, record_id: str, verdict: str, note: str | None,
            principal: Principal) -> Record:
    """Review a record and append its audit event (blocking)."""
    _visible(records, record_id, principal)
    before, after = records.review(record_id, verdict, note, principal.name, time.time())
    local.audit.record([AuditEvent(principal.name, "record.reviewed", record_id,
                                   {"review": before.review, "note": before.review_note},
                                   {"review": after.review, "note": after.review_note,
                                    "class_name": after.class_name})])
    return after


@router.post("/{record_id}/review", response_model=RecordOut, summary="Review a record: good or defective",
             dependencies=[Depends(Requires(Role.OPERATE))])
async def review_record(record_id: RecordId, body: ReviewRequest, records: RecordsDep, local: LocalDep,
                        principal: PrincipalDep) -> dict:
    """What the part really is (a later review replaces an earlier one); who reviewed it and when are stored, and
    the change is in the audit trail. The quality figures count reviewed records."""
    if body.note is not None and any(ord(c) < 32 and c not in "\n\t" for c in body.note):
        raise UnprocessableError("note holds control characters; send plain text")
    return (await asyncio.to_thread(_review, records, local, record_id, body.verdict, body.note, principal)).summary()


@router.post("/{record_id}/shot", response_model=FromResultsResponse,
             summary="A good part as a shot of its class, in one call", dependencies=[Depends(Requires(Role.OPERATE))])
async def record_as_shot(record_id: RecordId, records: RecordsDep, registry: RegistryDep, local: LocalDep,
                         principal: PrincipalDep) -> dict:
    """Reviews the record as good (unless it is already) and appends its kept upload as a shot of its class,
    which is recalibrated. A record reviewed defective is refused (422)."""
    r = await asyncio.to_thread(_visible, records, record_id, principal)
    if r.review == "defective":
        raise UnprocessableError(f"record '{record_id}' was reviewed defective: a shot must be a good part; review "
                                 "it good first if that was a mistake")
    if r.review != "good":
        await asyncio.to_thread(_review, records, local, record_id, "good", r.review_note, principal)
    return await shots_from_records(r.class_name, [record_id], registry, records, local, principal)
