"""The model repository, both backends by one set of tests (a data directory, and PostgreSQL): adding bundles
(checked before anything is stored, the same weights twice being one version), labels, resolving a version by
label or fingerprint prefix, local copies that load, the shared serving state and its revision, removal of what
serves refused, and for PostgreSQL the pushed state changes and copies into a fresh cache."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.bundle import SOWA_FILE, load_bundle, read_manifest
from service.core.errors import ConflictError, ModelNotFoundError, UnprocessableError
from service.core.models.open import open_repository
from service.core.models.repository import ModelRepository, ModelVersion, ServingState, find_version
from tests.service.test_model_versions import make_bundle

BACKENDS = ["directory", "postgresql"]


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second real bundle, of its own weights and input size."""
    return make_bundle(tmp_path_factory.mktemp("second") / "bundle", 96, 11)


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "data") if request.param == "directory" else request.getfixturevalue("pg_url")


@pytest.fixture()
def repo(url: str, tmp_path: Path) -> Iterator[ModelRepository]:
    r = open_repository(url, tmp_path / "data")
    yield r
    r.close()


def _weight_bytes(bundle: Path) -> int:
    return sum((bundle / name).stat().st_size for name in read_manifest(bundle).files)


def test_open_picks_the_backend(repo: ModelRepository, url: str) -> None:
    assert repo.kind == ("postgresql" if url.startswith("postgresql://") else "directory")
    assert repo.list() == [] and repo.state() == ServingState()


def test_add_lists_versions_oldest_first(repo: ModelRepository, bundle: Path, second: Path) -> None:
    v1 = repo.add(bundle, None, "cli:ann")
    info = read_manifest(bundle)
    assert v1.fingerprint == info.fingerprint and len(v1.fingerprint) == 64
    assert (v1.label, v1.added_by, v1.trained) == (None, "cli:ann", info.trained)
    assert v1.image_size == info.config.backbone.image_size and v1.bytes == _weight_bytes(bundle) > 0
    assert v1.version == v1.fingerprint[:16]
    v2 = repo.add(second, "v2", "serve")
    assert (v2.version, v2.image_size, v2.bytes) == ("v2", 96, _weight_bytes(second))
    assert v2.public() == {**v2.public(), "version": "v2", "fingerprint": v2.fingerprint, "label": "v2"}
    assert repo.list() == [v1, v2]  # oldest first, as stored


def test_same_weights_again_are_the_same_version(repo: ModelRepository, bundle: Path) -> None:
    v = repo.add(bundle, None, "a")
    assert repo.add(bundle, None, "b") == v  # not added again, not relabelled
    labelled = repo.add(bundle, "prod", "b")  # a free label given: the version takes it
    assert (labelled.fingerprint, labelled.label, labelled.added, labelled.added_by) == (v.fingerprint, "prod",
                                                                                         v.added, "a")
    assert repo.list() == [labelled]


def test_a_label_names_one_version(repo: ModelRepository, bundle: Path, second: Path) -> None:
    repo.add(bundle, "v1", "a")
    with pytest.raises(ConflictError, match="'v1' is taken"):
        repo.add(second, "v1", "a")
    assert [v.label for v in repo.list()] == ["v1"]  # the clash stored nothing
    for bad in ("V1", "-x", "a" * 65, "deadbeef01"):  # the last reads as a fingerprint prefix
        with pytest.raises(UnprocessableError):
            repo.add(second, bad, "a")
    assert len(repo.list()) == 1


@pytest.mark.parametrize("verify", [True, False])
def test_a_tampered_bundle_is_refused_and_nothing_stored(repo: ModelRepository, bundle: Path, tmp_path: Path,
                                                         verify: bool) -> None:
    bad = tmp_path / "tampered"
    shutil.copytree(bundle, bad)
    data = bytearray((bad / SOWA_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / SOWA_FILE).write_bytes(bytes(data))
    with pytest.raises(UnprocessableError, match="sha256 does not match"):
        repo.add(bad, "bad", "a", verify=verify)
    assert repo.list() == []
    with pytest.raises(ModelNotFoundError):
        repo.path(read_manifest(bad).fingerprint)
    if repo.kind == "directory":  # no copy left behind, complete or not
        assert sorted(p.name for p in (tmp_path / "data" / "models").iterdir()) == []
    else:
        with repo.pool.connection() as conn:  # type: ignore[attr-defined]
            assert conn.execute("SELECT count(*) FROM sowa_model_files").fetchone()[0] == 0
    with pytest.raises(UnprocessableError, match="no sowa.json"):
        repo.add(tmp_path, None, "a")


def test_resolve_by_label_fingerprint_or_prefix(repo: ModelRepository, bundle: Path, second: Path) -> None:
    v1, v2 = repo.add(bundle, None, "a"), repo.add(second, "v2", "a")
    assert repo.resolve("v2") == v2
    assert repo.resolve(v1.fingerprint) == v1
    assert repo.resolve(v1.fingerprint[:8]) == v1 and repo.resolve(v2.fingerprint[:20]) == v2
    for unknown in (v1.fingerprint[:7], "nosuch", "0" * 64, v1.fingerprint[:8].upper()):
        with pytest.raises(ModelNotFoundError):
            repo.resolve(unknown)


def test_an_ambiguous_prefix_names_nothing() -> None:
    versions = [ModelVersion(fp, None, 0.0, "a", 64, "x", True, 1) for fp in ("abcdef01" + "0" * 56,
                                                                               "abcdef01" + "1" * 56)]
    with pytest.raises(ModelNotFoundError, match="ambiguous"):
        find_version(versions, "abcdef01")
    assert find_version(versions, "abcdef011") == versions[1]


def test_path_holds_a_bundle_that_loads(repo: ModelRepository, second: Path) -> None:
    v = repo.add(second, "v2", "a")
    model, info = load_bundle(repo.path(v.fingerprint))
    assert info.fingerprint == v.fingerprint and model.image_size == 96
    with pytest.raises(ModelNotFoundError):
        repo.path("0" * 64)


def test_serving_state_is_shared_and_revisioned(repo: ModelRepository, url: str, tmp_path: Path, bundle: Path,
                                                second: Path) -> None:
    v1, v2 = repo.add(bundle, None, "a"), repo.add(second, "v2", "a")
    s = repo.set_state(active=v1.fingerprint)
    assert s == ServingState(active=v1.fingerprint, revision=1) == repo.state()
    other = open_repository(url, tmp_path / "data")  # another replica
    try:
        with pytest.raises(ConflictError, match="revision 1"):
            other.set_state(expect_revision=0, target=v2.fingerprint)
        s = other.set_state(expect_revision=1, target=v2.fingerprint, shadow=v2.fingerprint, shadow_share=0.25)
        assert s.revision == 2
        assert repo.state() == s == ServingState(v1.fingerprint, None, v2.fingerprint, v2.fingerprint, 0.25, 2)
        with pytest.raises(ModelNotFoundError):
            repo.set_state(active="0" * 64)
        with pytest.raises(UnprocessableError):
            repo.set_state(shadow_share=1.5)
        with pytest.raises(ValueError, match="unknown"):
            repo.set_state(activ=v1.fingerprint)
        assert other.state() == s  # the refused changes changed nothing
        s = repo.set_state(active=v2.fingerprint, previous=v1.fingerprint, target=None, shadow=None)
        assert other.state() == s == ServingState(v2.fingerprint, v1.fingerprint, None, None, 0.25, 3)
    finally:
        other.close()


def test_what_serves_cannot_be_removed(repo: ModelRepository, bundle: Path, second: Path) -> None:
    v1, v2 = repo.add(bundle, None, "a"), repo.add(second, "v2", "a")
    repo.set_state(active=v1.fingerprint)
    with pytest.raises(ConflictError, match="active"):
        repo.remove(v1.fingerprint)
    for role in ("target", "shadow"):
        repo.set_state(**{role: v2.fingerprint})
        with pytest.raises(ConflictError, match=role):
            repo.remove(v2.fingerprint)
        repo.set_state(**{role: None})
    repo.set_state(active=v2.fingerprint, previous=v1.fingerprint)
    assert repo.remove(v1.fingerprint) is True
    assert repo.list() == [v2] and repo.state().previous is None  # nothing left to roll back to
    assert repo.remove(v1.fingerprint) is False
    with pytest.raises(ModelNotFoundError):
        repo.path(v1.fingerprint)
    assert repo.add(bundle, "back", "a").label == "back"  # and it can come back


def test_directory_repository_pushes_nothing(tmp_path: Path) -> None:
    repo = open_repository(f"file://{tmp_path / 'data'}", tmp_path / "elsewhere")
    assert repo.kind == "directory" and repo.subscribe(lambda: None) is False
    assert (tmp_path / "data" / "models").is_dir() and not (tmp_path / "elsewhere").exists()


def test_postgres_pushes_state_changes(pg_url: str, tmp_path: Path, bundle: Path) -> None:
    a, b = open_repository(pg_url, tmp_path / "a"), open_repository(pg_url, tmp_path / "b")
    try:
        v = b.add(bundle, None, "b")
        changed = threading.Event()
        assert a.subscribe(changed.set) is True
        b.set_state(active=v.fingerprint)
        assert changed.wait(5)
        assert a.state().active == v.fingerprint
    finally:
        a.close()
        b.close()


def test_postgres_path_copies_into_a_fresh_cache(pg_url: str, tmp_path: Path, second: Path) -> None:
    a = open_repository(pg_url, tmp_path / "a")
    v = a.add(second, "v2", "a")
    a.close()
    b = open_repository(pg_url, tmp_path / "b")  # another host: nothing of the bundle on its disk
    try:
        path = b.path(v.fingerprint)
        assert path == tmp_path / "b" / "models-cache" / v.fingerprint
        assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in second.iterdir())
        assert all((path / p.name).read_bytes() == p.read_bytes() for p in second.iterdir())
        _, info = load_bundle(path)
        assert info.fingerprint == v.fingerprint
        mtime = (path / SOWA_FILE).stat().st_mtime_ns
        assert b.path(v.fingerprint) == path and (path / SOWA_FILE).stat().st_mtime_ns == mtime  # copied once
        (path / SOWA_FILE).write_bytes(b"truncated")  # a damaged copy is made again
        _, info = load_bundle(b.path(v.fingerprint))
        assert info.fingerprint == v.fingerprint
        assert [p.name for p in (tmp_path / "b" / "models-cache").iterdir()] == [v.fingerprint]
    finally:
        b.close()
