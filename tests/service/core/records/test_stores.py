"""Both record stores, one behaviour: idempotent batched writes, filters and keyset pages, reviews, the reads the
quality figures use, retention (numbers by age and count, images by age and bytes, shared image files and blobs
kept while a record names them); and the spool: group-committed frames read back, a torn tail cut, a failed append
cut back."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from service.core.records.record import Draft, Record
from service.core.records.spool import Spool, encode
from service.core.records.sqlite import SqliteRecordStore
from service.core.records.store import RecordQuery, RecordStore, Retention

NOW = 1_800_000_000.0
BIG = 10**12


def _draft(i: int, *, t: float | None = None, cls: str = "widget", flagged: bool = False, image: bytes | None = None,
           tags: tuple[str, ...] = ()) -> Draft:
    t = NOW + i if t is None else t
    thumb = None if image is None else b"T" + image
    return Draft(Record(id=f"{int(t * 1000):012x}{i:020x}", time=t, class_name=cls, revision="rev1", model="fp",
                        threshold=0.5, threshold_per_request=False, score=0.1 * (i % 10), normalized_score=0.5,
                        text_score=0.2, is_anomalous=flagged, filename=f"{i}.png", width=8, height=8,
                        regions=[{"box": [0, 0, 1, 1], "peak": 1.0, "area": 0.1}] if flagged else [],
                        part_id=f"P{i}", station="s1", tags=tags,
                        image_sha256=None if image is None else hashlib.sha256(image).hexdigest(),
                        thumbnail_sha256=None if thumb is None else hashlib.sha256(thumb).hexdigest(),
                        image_bytes=0 if image is None else len(image) + len(thumb or b"")), image, thumb)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordStore]:
    if request.param == "sqlite":
        s: RecordStore = SqliteRecordStore(tmp_path / "records")
    else:
        from service.core.records.postgres import PostgresRecordStore

        s = PostgresRecordStore(request.getfixturevalue("pg_url"))
    yield s
    s.close()


def test_writes_queries_and_reviews(store: RecordStore) -> None:
    drafts = [_draft(i, flagged=i % 3 == 0, tags=("line1", "night") if i < 5 else ("line2",)) for i in range(12)]
    store.write(drafts[:8])
    store.write(drafts[4:])  # a replay of part of a batch: nothing doubles
    assert store.stats()["records"] == 12
    got = store.get(drafts[3].record.id)
    assert got == drafts[3].record  # every field round-trips (regions, tags, booleans)
    assert store.get("0" * 32) is None
    everything = store.query(RecordQuery(limit=100))
    assert [r.id for r in everything] == sorted((d.record.id for d in drafts), reverse=True)
    first = store.query(RecordQuery(limit=5))
    second = store.query(RecordQuery(limit=5, before=first[-1].id))
    assert [r.id for r in first + second] == [r.id for r in everything[:10]]
    for q, n in ((RecordQuery(tag="night"), 5), (RecordQuery(tag="line"), 0), (RecordQuery(verdict="fail"), 4),
                 (RecordQuery(part_id="P7"), 1), (RecordQuery(station="s1", since=NOW + 10), 2),
                 (RecordQuery(until=NOW + 2), 2), (RecordQuery(class_name="other"), 0)):
        assert len(store.query(q)) == n, q
    assert [r.id for r in store.iter_records(RecordQuery(), batch=5)] == [r.id for r in everything]
    after = store.review(drafts[2].record.id, "defective", "<b>x</b>", "alice", NOW + 100)
    assert after is not None and (after.review, after.review_note, after.reviewed_by) == ("defective", "<b>x</b>",
                                                                                          "alice")
    store.review(drafts[4].record.id, "good", None, "bob", NOW + 101)
    assert store.review("0" * 32, "good", None, "bob", NOW) is None
    assert {r.id for r in store.query(RecordQuery(reviewed=True))} == {drafts[2].record.id, drafts[4].record.id}
    assert len(store.query(RecordQuery(reviewed=False))) == 10
    assert [(p.score, p.defective) for p in store.reviewed_parts("widget", 10)] == [(0.4, False), (0.2, True)]
    passed = store.passed_parts("widget", 3)
    assert [p.time for p in passed] == [NOW + 8, NOW + 10, NOW + 11]  # the newest, oldest first


def test_images_are_content_addressed_and_retention_keeps_its_bounds(store: RecordStore) -> None:
    shared = b"same image bytes" * 100
    drafts = [_draft(i, image=shared if i < 2 else os.urandom(1000 + i)) for i in range(10)]
    store.write(drafts)
    assert store.image(drafts[0].record.id) == shared and store.thumbnail(drafts[1].record.id) == b"T" + shared
    assert store.image(drafts[5].record.id) == drafts[5].image
    total = store.stats()["image_bytes"]
    # numbers by count: the two oldest go, and the image they shared stays while... no one names it: gone
    result = store.sweep(Retention(max_age_s=BIG, max_records=8, image_max_age_s=BIG, image_max_bytes=BIG), NOW + 20)
    assert result.records_removed == 2 and store.stats()["records"] == 8
    assert store.get(drafts[0].record.id) is None and store.image(drafts[0].record.id) is None
    # images by bytes: the oldest images go until the rest fit; their records stay
    budget = total // 2
    store.sweep(Retention(max_age_s=BIG, max_records=BIG, image_max_age_s=BIG, image_max_bytes=budget), NOW + 20)
    assert store.stats()["image_bytes"] <= budget and store.stats()["records"] == 8
    kept = [d for d in drafts[2:] if store.image(d.record.id) is not None]
    assert kept and kept == drafts[-len(kept):]  # the newest kept, the oldest out
    gone = store.get(drafts[2].record.id)
    assert gone is not None and gone.image_sha256 is None and gone.image_bytes == 0
    # images by age, then numbers by age
    store.sweep(Retention(max_age_s=BIG, max_records=BIG, image_max_age_s=0.5, image_max_bytes=BIG), NOW + 9.4)
    assert [d.record.id for d in drafts if store.image(d.record.id)] == [drafts[9].record.id]
    store.sweep(Retention(max_age_s=3.5, max_records=BIG, image_max_age_s=BIG, image_max_bytes=BIG), NOW + 10)
    assert sorted(r.time for r in store.query(RecordQuery())) == [NOW + 7, NOW + 8, NOW + 9]


def test_sqlite_leaves_no_unnamed_image_files(tmp_path: Path) -> None:
    store = SqliteRecordStore(tmp_path / "r")
    drafts = [_draft(i, image=os.urandom(500)) for i in range(4)]
    store.write(drafts)
    store.sweep(Retention(max_age_s=BIG, max_records=1, image_max_age_s=BIG, image_max_bytes=BIG), NOW)
    files = {p.name for p in (tmp_path / "r" / "images").rglob("*") if p.is_file()}
    assert files == {drafts[3].record.image_sha256, drafts[3].record.thumbnail_sha256}
    store.close()


def test_spool_frames_round_trip_and_a_torn_tail_is_cut(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", segment_bytes=1500)
    assert list(spool.open()) == []
    drafts = [_draft(i, image=os.urandom(700) if i % 2 else None) for i in range(6)]
    positions = spool.append([encode(d) for d in drafts[:3]]) + spool.append([encode(d) for d in drafts[3:]])
    assert spool.read_many(positions) == drafts and spool.read(positions[4]) == drafts[4]
    assert len({p.segment for p in positions}) > 1  # rotated at segment_bytes
    spool.close()
    last = spool.path(positions[-1].segment)
    with last.open("ab") as f:
        f.write(encode(drafts[0])[:-10])  # a crash mid-write: its answer never left
    again = Spool(tmp_path / "spool")
    assert [d for _, d in again.open()] == drafts
    assert last.stat().st_size == positions[-1].offset + positions[-1].size  # the torn bytes are gone
    again.close()


def test_a_failed_append_is_cut_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    list(spool.open())
    ok = spool.append([encode(_draft(0))])
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        spool.append([encode(_draft(1)), encode(_draft(2))])
    monkeypatch.setattr(os, "fsync", real_fsync)
    spool.append([encode(replace(_draft(3)))])
    spool.close()
    assert [d.record.id for _, d in Spool(tmp_path / "spool").open()] == [_draft(0).record.id, _draft(3).record.id]
    assert ok[0].offset == 0
