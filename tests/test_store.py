"""DirectoryStore on its own: the files it writes, what it reports as changed, and what it refuses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from model.calibration import Calibration
from model.inference import ClassMemory
from model.memory_bank import MemoryBank
from service.store import ClassRecord, ClassStore, DirectoryStore, StoreChanges


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


def test_changes_report_other_writers_once_and_not_our_own(tmp_path: Path) -> None:
    ours, theirs = DirectoryStore(tmp_path), DirectoryStore(tmp_path)  # two replicas on one directory
    shots = _shots(b"a")
    theirs.write(_record("gear", shots), shots)
    assert ours.changes() == StoreChanges(changed=("gear",))  # the first report names every class
    theirs.write(_record("belt", shots), shots)
    ours.write(_record("gear", shots, override=0.9), {})
    assert ours.changes() == StoreChanges(changed=("belt",))
    assert ours.changes() == StoreChanges()
    theirs.delete("belt")
    assert ours.changes() == StoreChanges(deleted=("belt",))
    assert not ours.delete("belt") and not (tmp_path / "classes" / "belt").exists()


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
