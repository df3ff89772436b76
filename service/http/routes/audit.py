"""The audit trail (admins only): newest first a page at a time, or exported whole (CSV or JSON Lines), with the
same filters. Nothing here changes an event: the trail is append-only from the API, and retention
(`audit_retention_days`, service/core/runtime.py) is the only thing that removes any.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from ...core.access.audit import AuditAction, AuditEvent, AuditQuery
from ...core.access.roles import Role
from ...core.access.store import AccessStore
from ...core.errors import NotReadyError
from ..auth import Requires
from ..deps import RuntimeDep
from ..query_params import only_params
from ..schemas import AuditPage

__all__ = ["router"]

router = APIRouter(prefix="/audit", tags=["audit"], dependencies=[Depends(Requires(Role.ADMIN))])

PAGE_DEFAULT, PAGE_MAX = 100, 1000
EXPORT_BATCH = 1000  # events read per query while exporting: what the export holds in memory at once
CSV_COLUMNS = ("id", "time", "actor", "action", "target", "before", "after")
_TEXT = r"^[^\x00-\x1f\x7f]{1,200}$"  # a name as the trail holds it; no control characters


def _filters(
    actor: Annotated[str | None, Query(pattern=_TEXT, description="who: a key's name, SOWA_API_KEY, anonymous, "
                                       "cli:<user>")] = None,
    action: Annotated[AuditAction | None, Query(description="what kind of change")] = None,
    target: Annotated[str | None, Query(pattern=_TEXT, description="the class or key changed")] = None,
    since: Annotated[float | None, Query(ge=0, description="events at or after this time (unix seconds)")] = None,
    until: Annotated[float | None, Query(ge=0, description="events before this time (unix seconds)")] = None,
    after: Annotated[str | None, Query(pattern="^[0-9a-f]{32}$", description="a page's `next`: events older than "
                                       "that id")] = None,
) -> AuditQuery:
    return AuditQuery(actor, action, target, since, until, after)


Filters = Annotated[AuditQuery, Depends(_filters)]
_FILTERS = ("actor", "action", "target", "since", "until", "after")



def _store(runtime: RuntimeDep) -> AccessStore:
    if runtime.access is None:
        raise NotReadyError("the audit store is not open yet; see /readyz", headers={"Retry-After": "5"})
    return runtime.access


@router.get("", response_model=AuditPage, summary="The audit trail, newest first, a page at a time",
            dependencies=[only_params(*_FILTERS, "limit")])
async def audit(
    runtime: RuntimeDep, q: Filters,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="events per page")] = PAGE_DEFAULT,
) -> dict:
    """Who changed what and when, with what mattered before and after. Keyset paging: pass `next` as `after`;
    an event recorded meanwhile never shifts the pages (it is newer than every one of them)."""
    events = await asyncio.to_thread(_store(runtime).query, replace(q, limit=limit + 1))  # one more: is there a next
    page = events[:limit]
    return {"events": [e.as_dict() for e in page], "next": page[-1].id if len(events) > limit else None}


def _csv(events: list[AuditEvent], header: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    for e in events:  # before/after as JSON; an empty cell is null (did not exist, or is gone)
        writer.writerow((e.id, repr(e.time), e.actor, e.action, e.target,
                         "" if e.before is None else json.dumps(e.before, separators=(",", ":")),
                         "" if e.after is None else json.dumps(e.after, separators=(",", ":"))))
    return out.getvalue()


def _jsonl(events: list[AuditEvent]) -> str:
    return "".join(json.dumps(e.as_dict(), separators=(",", ":")) + "\n" for e in events)


def _take(events: Iterator[AuditEvent]) -> list[AuditEvent]:
    return list(itertools.islice(events, EXPORT_BATCH))


@router.get("/export", response_class=StreamingResponse, summary="Export the audit trail: CSV or JSON Lines",
            responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}},
                             "description": "every matching event, newest first"}},
            dependencies=[only_params(*_FILTERS, "format")])
async def export(
    runtime: RuntimeDep, q: Filters,
    format: Annotated[Literal["csv", "jsonl"], Query(description="csv: a header row, before/after as JSON cells "
                                                     "(empty: null); jsonl: one event per line")] = "jsonl",
) -> StreamingResponse:
    """Streamed: read a batch at a time on a worker thread, so an export of any length holds one batch in
    memory. A store failure before the first batch answers its error; after, the stream is cut off (no final
    chunk), so a client never takes a short export for a whole one."""
    events = _store(runtime).iter_events(q, EXPORT_BATCH)
    first = await asyncio.to_thread(_take, events)  # errors here still answer with a status

    async def body() -> AsyncIterator[str]:
        batch, header = first, True
        if format == "csv" and not batch:
            yield _csv([], True)
        while batch:
            yield _csv(batch, header) if format == "csv" else _jsonl(batch)
            header = False
            batch = await asyncio.to_thread(_take, events) if len(batch) == EXPORT_BATCH else []

    media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
    return StreamingResponse(body(), media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="sowa-audit.{format}"'})
