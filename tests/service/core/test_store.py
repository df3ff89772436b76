"""The class stores on their own. The behaviour every backend owes the registry (round trips, change reports
across two stores on one backing, refusals, the lock between replicas) runs against both, the directory and a
real PostgreSQL (one server per session, a database per test); the directory's file layout, its damage handling
and PostgreSQL's schema versions are tested on their own."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from model.calibration import Calibration
from model.inference import ClassMemory
from model.memory_bank import MemoryBank
from service.core.store import ClassRecord, ClassStore, DirectoryStore, StoreChanges, open_store


def _record(name: str, shots: dict[str, bytes], fingerprint: str = "fp-1",
            override: float | None = None) -> ClassRecord:
    bank = MemoryBank(torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3), 2)
    memory = ClassMemory(bank, Calibration(map_mean=1.0, map_std=0.5, text_mean=0.2, threshold=0.6, shots=2))
    return ClassRecord(name, tuple(shots), memory, override, 100.0, 200.0, fingerprint)


def _shots(*payloads: bytes) -> dict[str, bytes]:
    return {hashlib.sha256(p).hexdigest(): p for p in payloads}


def test_the_directory_layout_and_manifest_are_format_1(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    assert isinstance(store, ClassStore)
    shots = _shots(b"one", b"two")
    store.write(_record("widget", shots, override=0.7), shots)
    folder = tmp_path / "classes" / "widget"
    assert sorted(p.name for p in folder.iterdir()) == ["bank.safetensors", "class.json", "shots"]
    assert sorted(p.stem for p in (folder / "shots").glob("*.png")) == sorted(shots)
    m = json.loads((folder / "class.json").read_text())
    assert list(m) == ["format_version", "name", "shots", "bundle_fingerprint", "bank_sha256", "bank_shots",
                       "calibration", "threshold_override", "created", "updated"]
    assert m["format_version"] == 1 and m["name"] == "widget" and m["threshold_override"] == 0.7
    assert m["bank_sha256"] == hashlib.sha256((folder / "bank.safetensors").read_bytes()).hexdigest()
    back = store.read("widget", "fp-1")
    assert back is not None and back.shots == tuple(shots) and back.memory is not None
    assert torch.equal(back.memory.bank.features, _record("widget", shots).memory.bank.features)
    assert store.read("widget", "another-bundle").memory is None  # rebuilt by the registry
    assert store.read("widget", None).memory is None and store.read("ghost", "fp-1") is None
    assert store.read_shot("widget", next(iter(shots))) == b"one"


StoreFactory = Callable[[], ClassStore]


@pytest.fixture(params=["directory", "postgresql"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Makes stores on one backing, as replicas sharing it have them (recovered, as the registry starts them)."""
    url = str(tmp_path / "data") if request.param == "directory" else request.getfixturevalue("pg_url")
    made: list[ClassStore] = []

    def make() -> ClassStore:
        store = open_store(url)
        store.recover()
        made.append(store)
        return store

    yield make
    for store in made:
        getattr(store, "close", lambda: None)()


def test_round_trip(new_store: StoreFactory) -> None:
    store = new_store()
    assert isinstance(store, ClassStore) and store.changes() == StoreChanges()
    shots = _shots(b"one", b"two")
    store.write(_record("widget", shots, override=0.7), shots)
    back = store.read("widget", "fp-1")
    assert back is not None and back.shots == tuple(shots) and back.memory is not None
    assert back.threshold_override == 0.7 and (back.created, back.updated) == (100.0, 200.0)
    assert back.bundle_fingerprint == "fp-1" and back.memory.calibration == _record("w", shots).memory.calibration
    assert torch.equal(back.memory.bank.features, _record("widget", shots).memory.bank.features)
    assert back.memory.bank.shots == 2
    assert store.read("widget", "another-bundle").memory is None  # rebuilt by the registry
    assert store.read("widget", None).memory is None and store.read("ghost", "fp-1") is None
    assert store.read_shot("widget", next(iter(shots))) == b"one"
    three = _shots(b"two", b"three")  # replace: the shot no longer named goes
    store.write(_record("widget", three), {k: v for k, v in three.items() if v == b"three"})
    assert store.read("widget", None).shots == tuple(three)
    with pytest.raises((ValueError, FileNotFoundError)):
        store.read_shot("widget", hashlib.sha256(b"one").hexdigest())


def test_changes_report_other_writers_once_and_not_our_own(new_store: StoreFactory) -> None:
    ours, theirs = new_store(), new_store()  # two replicas on one backing
    shots = _shots(b"a")
    theirs.write(_record("gear", shots), shots)
    assert ours.changes() == StoreChanges(changed=("gear",))  # the first report names every class
    theirs.write(_record("belt", shots), shots)
    ours.write(_record("gear", shots, override=0.9), {})
    assert ours.changes() == StoreChanges(changed=("belt",))
    assert ours.changes() == StoreChanges()
    theirs.write(_record("belt", shots, override=0.3), {})
    assert ours.changes() == StoreChanges(changed=("belt",)) and ours.read("belt", None).threshold_override == 0.3
    theirs.delete("belt")
    assert ours.changes() == StoreChanges(deleted=("belt",))
    assert not ours.delete("belt") and ours.read("belt", None) is None


def test_the_lock_makes_replicas_take_turns(new_store: StoreFactory) -> None:
    a, b = new_store(), new_store()
    shots = _shots(b"s0")
    a.write(_record("gear", shots), shots)
    inside: list[str] = []

    def append(store: ClassStore, payload: bytes) -> None:  # read-modify-write, as the registry does it
        with store.lock("gear"):
            inside.append("enter")
            current = store.read("gear", None)
            time.sleep(0.2)  # the other replica would read the same shots now, were there no lock
            new = _shots(payload)
            store.write(_record("gear", {**dict.fromkeys(current.shots, b""), **new}), new)
            inside.append("leave")

    threads = [threading.Thread(target=append, args=(s, p)) for s, p in ((a, b"s1"), (b, b"s2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert inside == ["enter", "leave", "enter", "leave"]
    assert len(a.read("gear", None).shots) == 3 and b.read("gear", None).shots == a.read("gear", None).shots


def test_bad_names_are_refused(new_store: StoreFactory) -> None:
    store = new_store()
    for bad in ("../etc", "Bad Name", "", "x'; DROP TABLE sowa_classes; --"):
        with pytest.raises(ValueError, match="invalid class name"):
            store.read(bad, None)
        with pytest.raises(ValueError, match="invalid class name"):
            store.read_shot(bad, "0" * 64)
        with pytest.raises(ValueError, match="invalid class name"):
            store.delete(bad)
        with pytest.raises(ValueError, match="invalid class name"), store.lock(bad):
            pass


def test_damage_and_bad_names_are_refused(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    shots = _shots(b"x")
    store.write(_record("ok", shots), shots)
    (tmp_path / "classes" / "Bad Name").mkdir()
    (tmp_path / "classes" / "half" / "shots").mkdir(parents=True)  # a first registration that crashed
    (tmp_path / "classes" / ".trash-old-0").mkdir()  # a delete that crashed
    assert store.recover() == {"Bad Name": "directory name is not a valid class name"}
    assert not (tmp_path / "classes" / ".trash-old-0").exists()
    assert not (tmp_path / "classes" / "half").exists()  # never a class (no 2xx was sent): removed, not refused
    shot = tmp_path / "classes" / "ok" / "shots" / f"{next(iter(shots))}.png"
    shot.write_bytes(b"y")
    with pytest.raises(ValueError, match="does not match its hash"):
        store.read_shot("ok", next(iter(shots)))
    (tmp_path / "classes" / "ok" / "class.json").write_text("{not json")
    with pytest.raises(ValueError, match="class.json unreadable"):
        store.read("ok", "fp-1")
    for bad in ("../etc", "Bad Name", ""):
        with pytest.raises(ValueError, match="invalid class name"):
            store.read(bad, None)
        with pytest.raises(ValueError, match="invalid class name"), store.lock(bad):
            pass


def test_store_urls(tmp_path: Path) -> None:
    from service.core.settings import Settings
    from service.core.store import store_kind

    assert isinstance(open_store(tmp_path / "a"), DirectoryStore)
    assert open_store(f"file://{tmp_path}/b").root == tmp_path / "b" / "classes"
    pg = open_store("postgresql://sowa:secret@db.example:5432/sowa")  # nothing connects before recover()
    assert store_kind("postgres://x/y") == "postgresql" and "secret" not in repr(pg)
    pg.close()
    with pytest.raises(ValueError, match="unknown store URL scheme"):
        open_store("s3://bucket/classes")
    with pytest.raises(ValueError, match="store must be"):
        Settings(bundle=tmp_path, store="s3://bucket")
    settings = Settings(bundle=tmp_path, data_dir=tmp_path / "d")
    assert settings.store_url == str(tmp_path / "d") and "secret" not in repr(Settings(bundle=tmp_path,
                                                                                         store=pg.url))
