"""The class stores on their own. The behaviour every backend owes the registry (round trips, change reports
across two stores on one backing, refusals, the lock between replicas) runs against both, the directory and a
real PostgreSQL (one server per session, a database per test); the directory's file layout, its damage handling
and PostgreSQL's schema versions are tested on their own."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

from model.calibration import Calibration
from model.inference import ClassMemory
from model.memory_bank import MemoryBank
from service.core.store import ClassRecord, ClassStore, DirectoryStore, StoreChanges, open_store
from service.core.store.postgres import PostgresStore


def _record(name: str, shots: dict[str, bytes], fingerprint: str = "fp-1",
            override: float | None = None) -> ClassRecord:
    bank = MemoryBank(torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3), 2)
    memory = ClassMemory(bank, Calibration(map_mean=1.0, map_std=0.5, text_mean=0.2, threshold=0.6, shots=2))
    return ClassRecord(name, tuple(shots), memory, override, 100.0, 200.0, fingerprint)


def _shots(*payloads: bytes) -> dict[str, bytes]:
    return {hashlib.sha256(p).hexdigest(): p for p in payloads}


def test_the_directory_layout_and_manifest_are_format_2(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    shots = _shots(b"one", b"two")
    store.write(_record("widget", shots, override=0.7), shots)
    folder = tmp_path / "classes" / "widget"
    assert sorted(p.name for p in folder.iterdir()) == ["banks", "class.json", "shots"]
    assert sorted(p.name for p in (tmp_path / "classes").iterdir()) == [".generation", "widget"]
    assert sorted(p.stem for p in (folder / "shots").glob("*.png")) == sorted(shots)
    m = json.loads((folder / "class.json").read_text())
    assert list(m) == ["format_version", "name", "shots", "created", "updated", "models"]
    assert m["format_version"] == 2 and m["name"] == "widget" and list(m["models"]) == ["fp-1"]
    entry = m["models"]["fp-1"]
    assert entry["threshold_override"] == 0.7 and entry["bank_shots"] == 2
    bank = folder / "banks" / f"{entry['bank_sha256']}.safetensors"
    assert [p.name for p in (folder / "banks").iterdir()] == [bank.name]
    assert entry["bank_sha256"] == hashlib.sha256(bank.read_bytes()).hexdigest()
    back = store.read("widget", "fp-1")
    assert back is not None and back.shots == tuple(shots) and back.memory is not None and back.models == ("fp-1",)
    assert torch.equal(back.memory.bank.features, _record("widget", shots).memory.bank.features)
    assert store.read("widget", "another-bundle").memory is None  # rebuilt by the registry
    assert store.read("widget", None).memory is None and store.read("ghost", "fp-1") is None
    assert store.read_shot("widget", next(iter(shots))) == b"one"


def test_a_version_1_folder_reads_and_is_written_as_version_2(tmp_path: Path) -> None:
    """A class stored by the release before model versions: one bank.safetensors, one fingerprint."""
    from safetensors.torch import save_file

    shots = _shots(b"one", b"two")
    folder = tmp_path / "classes" / "widget"
    (folder / "shots").mkdir(parents=True)
    for digest, data in shots.items():
        (folder / "shots" / f"{digest}.png").write_bytes(data)
    record = _record("widget", shots)
    save_file({"features": record.memory.bank.features}, str(folder / "bank.safetensors"))
    (folder / "class.json").write_text(json.dumps({
        "format_version": 1, "name": "widget", "shots": list(shots), "bundle_fingerprint": "fp-1",
        "bank_sha256": hashlib.sha256((folder / "bank.safetensors").read_bytes()).hexdigest(), "bank_shots": 2,
        "calibration": dataclasses.asdict(record.memory.calibration), "threshold_override": 0.7, "created": 100.0,
        "updated": 200.0}))
    store = DirectoryStore(tmp_path)
    assert store.recover() == {}
    back = store.read("widget", "fp-1")
    assert back.memory is not None and back.threshold_override == 0.7 and back.models == ("fp-1",)
    assert torch.equal(back.memory.bank.features, record.memory.bank.features)
    # a second model's bank: written as version 2, the version-1 bank kept while its model is named
    assert store.write_bank("widget", "fp-2", _record("widget", shots).memory, tuple(shots))
    m = json.loads((folder / "class.json").read_text())
    assert m["format_version"] == 2 and sorted(m["models"]) == ["fp-1", "fp-2"]
    assert store.read("widget", "fp-1").memory is not None and store.read("widget", "fp-2").memory is not None
    # the first model's own write replaces its version-1 bank by a content-addressed one
    store.write(dataclasses.replace(record, threshold_override=0.7), {})
    assert not (folder / "bank.safetensors").exists()
    assert store.read("widget", "fp-1").memory is not None and store.read("widget", "fp-1").threshold_override == 0.7


def test_banks_and_overrides_are_per_model(new_store: StoreFactory) -> None:
    store = new_store()
    shots = _shots(b"a", b"b")
    store.write(_record("gear", shots, override=0.4), shots)
    other = _record("gear", shots, fingerprint="fp-2")
    assert store.write_bank("gear", "fp-2", other.memory, tuple(shots))
    one, two = store.read("gear", "fp-1"), store.read("gear", "fp-2")
    assert one.threshold_override == 0.4 and two.threshold_override is None  # v1's override is not v2's
    assert two.memory is not None and two.bundle_fingerprint == "fp-2" and set(one.models) == {"fp-1", "fp-2"}
    store.write(dataclasses.replace(other, threshold_override=0.8), {})  # v2's own override; same shots
    assert store.read("gear", "fp-1").memory is not None and store.read("gear", "fp-1").threshold_override == 0.4
    assert store.read("gear", "fp-2").threshold_override == 0.8
    assert not store.write_bank("gear", "fp-3", other.memory, ("not", "these"))  # its shots changed meanwhile
    assert not store.write_bank("ghost", "fp-3", other.memory, tuple(shots))
    # new shots: the other model's bank goes (fitted on the old ones), its override stays
    new = _shots(b"c")
    store.write(_record("gear", new), new)
    assert store.read("gear", "fp-2").memory is None and store.read("gear", "fp-2").threshold_override == 0.8
    assert store.read("gear", "fp-1").threshold_override is None and store.read("gear", "fp-1").models == ("fp-1",)
    assert store.write_bank("gear", "fp-2", other.memory, tuple(new))
    assert store.drop_model("fp-2") == 1 and store.read("gear", "fp-2").memory is None
    assert store.read("gear", "fp-2").threshold_override == 0.8 and store.read("gear", "fp-1").memory is not None


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
        store.close()


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {n: inspect.signature(v) for n, v in vars(ClassStore).items() if inspect.isfunction(v)
            and not n.startswith("_")}


@pytest.mark.parametrize("backend", [DirectoryStore, PostgresStore])
def test_every_backend_has_each_member_of_the_protocol_with_its_signature(backend: type) -> None:
    methods = _protocol_methods()
    assert {"recover", "sweep", "subscribe", "changes", "unsee", "read", "read_shot", "write", "write_bank",
            "drop_model", "delete", "lock", "close"} == set(methods)
    for name, want in methods.items():
        got = inspect.signature(getattr(backend, name))
        assert list(got.parameters.values()) == list(want.parameters.values()), f"{backend.__name__}.{name}{got}"
        wrapped = hasattr(getattr(backend, name), "__wrapped__")  # @contextmanager: a generator, documented
        assert wrapped or got.return_annotation == want.return_annotation, f"{backend.__name__}.{name}{got}"
    assert set(ClassStore.__annotations__) == {"kind", "error", "reconnects", "notifications"}


def test_the_protocol_members_behave_on_both_backends(new_store: StoreFactory) -> None:
    store = new_store()
    assert store.kind in ("directory", "postgresql") and store.error is None
    assert (store.reconnects, store.notifications) == (0, 0)
    assert store.subscribe(lambda: None) is (store.kind == "postgresql")  # only PostgreSQL pushes
    assert store.sweep() == 0
    assert isinstance(store.lock("gear"), AbstractContextManager)
    store.close()
    store.close()  # twice is no error


def test_round_trip(new_store: StoreFactory) -> None:
    store = new_store()
    assert store.changes() == StoreChanges()
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
    assert ours.changes() == StoreChanges(changed=("belt",)) and ours.read("belt", "fp-1").threshold_override == 0.3
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


def test_a_deleted_class_leaves_no_lock_file(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.recover()
    shots = _shots(b"x")
    for name in ("gear", "belt"):
        with store.lock(name):
            store.write(_record(name, shots), shots)
    with store.lock("gear"):  # as the registry deletes: under the class's lock
        assert store.delete("gear")
    with store.lock("ghost"):  # a first registration that failed: no class, so no lock either
        pass
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["belt.lock"]
    (tmp_path / "locks" / "old.lock").touch()  # left by a delete without the lock, or an older release
    assert store.sweep() == 0 and sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["belt.lock"]


def test_a_waiter_on_a_removed_lock_file_takes_the_new_one(tmp_path: Path) -> None:
    """A replica waits on a class's lock while another deletes the class (and its lock file): once it has the
    lock, a third replica must not get it too by creating a fresh file under the same name."""
    a, b, c = (DirectoryStore(tmp_path) for _ in range(3))
    shots = _shots(b"x")
    a.write(_record("gear", shots), shots)
    b_inside, b_release = threading.Event(), threading.Event()

    def register_again() -> None:
        with b.lock("gear"):
            b.write(_record("gear", shots), shots)
            b_inside.set()
            b_release.wait(30)

    with a.lock("gear"):
        waiter = threading.Thread(target=register_again)
        waiter.start()
        time.sleep(0.2)  # b is blocked on the lock file a is about to remove
        assert a.delete("gear") and not b_inside.is_set()
    assert b_inside.wait(30)
    with c._try_lock("gear") as locked:
        assert not locked  # b holds the lock of the file now at the path
    b_release.set()
    waiter.join(30)
    assert c.read("gear", None) is not None and (tmp_path / "locks" / "gear.lock").exists()


def _count_fs_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the file-system calls a directory store makes (stat, listings, opens), the real ones still made."""
    counts = dict.fromkeys(("stat", "listdir", "scandir", "open"), 0)
    for module, name, key in ((os, "stat", "stat"), (os, "listdir", "listdir"), (os, "scandir", "scandir"),
                              (io, "open", "open")):
        real = getattr(module, name)

        def counted(*args: object, _real: Callable = real, _key: str = key, **kw: object) -> object:
            counts[_key] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(module, name, counted)
    return counts


@pytest.mark.parametrize("rescan_s", [60.0, 0.0])
def test_an_idle_look_costs_the_same_for_1_and_200_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            rescan_s: float) -> None:
    shots = _shots(b"x")
    calls = {}
    for n in (1, 200):
        writer = DirectoryStore(tmp_path / str(n))
        for i in range(n):
            writer.write(_record(f"c{i:03d}", shots), shots)
        follower = DirectoryStore(tmp_path / str(n), rescan_s=rescan_s)  # another replica, following
        assert len(follower.changes().changed) == n
        with monkeypatch.context() as m:
            counts = _count_fs_calls(m)
            assert all(follower.changes() == StoreChanges() for _ in range(5))  # five idle ticks
        calls[n] = sum(counts.values())
        writer.write(_record("c000", shots, override=0.5), {})  # a change is still found at the next look
        assert follower.changes() == StoreChanges(changed=("c000",))
    if rescan_s:
        assert calls[1] == calls[200] <= 5 * 2, calls  # one read of the change marker a tick
    else:  # a scan every look (the counting sees it): what the marker saves
        assert calls[200] > 50 * calls[1], calls
