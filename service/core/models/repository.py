"""The model repository's interface: versions (bundles, named by their weights' fingerprint and an optional label)
and the serving state every replica shares, plus the checks both backends share.

Two backends: `DirectoryModelRepository` (directory.py, files under the data directory, for a directory store) and
`PostgresModelRepository` (postgres.py, rows beside a PostgreSQL store); `open_repository` (open.py) picks by the
store URL. A version is stored only once its bundle has passed the checks (`check_bundle`): a 2xx of `add` means
the whole bundle is there, hash-checked, and a broken one leaves nothing behind.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from model.bundle import MANIFEST, BundleError, BundleInfo, load_bundle, read_manifest
from model.files import sha256_file

from ..class_names import CLASS_NAME
from ..errors import ConflictError, ModelNotFoundError, UnprocessableError

__all__ = [
    "MIN_PREFIX",
    "ModelRepository",
    "ModelVersion",
    "ServingState",
    "bundle_files",
    "check_bundle",
    "check_label",
    "check_state_changes",
    "clean_leftovers",
    "find_version",
    "manifest_of",
    "removal_conflict",
]

log = logging.getLogger("sowa.models")

MIN_PREFIX = 8  # a fingerprint prefix shorter than this names nothing (too easy to mistype into another)
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class ModelVersion:
    """One stored bundle."""

    fingerprint: str  # full sha256 hex (BundleInfo.fingerprint)
    label: str | None  # unique among versions
    added: float  # unix time
    added_by: str  # the actor: "cli:<user>", a key name, "serve"
    image_size: int
    arch: str
    trained: bool
    bytes: int  # the weight files' bytes

    @property
    def version(self) -> str:
        """How the version is shown: its label, else the fingerprint's first 16 hex digits."""
        return self.label if self.label is not None else self.fingerprint[:16]

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "version": self.version}

    @classmethod
    def from_info(cls, info: BundleInfo, label: str | None, added: float, added_by: str, size: int
                  ) -> ModelVersion:
        bb = info.config.backbone
        return cls(info.fingerprint, label, added, added_by, bb.image_size, bb.arch or "custom", info.trained, size)


@dataclass(frozen=True)
class ServingState:
    """What the replicas serve, as they share it (see activation.py)."""

    active: str | None = None  # the fingerprint serving now
    previous: str | None = None  # what a rollback goes back to
    target: str | None = None  # an activation asked and not finished
    shadow: str | None = None
    shadow_share: float = 0.0
    revision: int = 0  # bumped by every set_state

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ServingState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


class ModelRepository(Protocol):
    """Where model versions and the serving state live (see the module docstring)."""

    kind: ClassVar[str]  # "directory" or "postgresql"

    def add(self, bundle_dir: Path, label: str | None, actor: str, verify: bool = True,
            copy: bool = True) -> ModelVersion:
        """Store the bundle in `bundle_dir` (see `check_bundle` for `verify`; `copy=False`: a directory repository
        records where it is instead of copying it, for the service's configured bundle). The same fingerprint again
        is the existing version (given a label, it takes it); a label another version has -> ConflictError; a
        broken bundle -> UnprocessableError, nothing stored."""
        ...

    def list(self) -> list[ModelVersion]:
        """Every version, oldest first."""
        ...

    def resolve(self, version: str) -> ModelVersion:
        """A label, a full fingerprint or a unique prefix of >= 8 hex digits; ModelNotFoundError otherwise."""
        ...

    def path(self, fingerprint: str) -> Path:
        """A local directory holding that bundle, for load_bundle."""
        ...

    def remove(self, fingerprint: str) -> bool:
        """Remove a version (False: there was none); ConflictError for the active, target or shadow model."""
        ...

    def state(self) -> ServingState:
        ...

    def set_state(self, expect_revision: int | None = None, **changes: Any) -> ServingState:
        """Change fields of the state at once, across replicas; ConflictError when `expect_revision` is given and
        the state is at another revision. Fingerprints must name stored versions (ModelNotFoundError)."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> bool:
        """Call `callback` (from another thread) when the state changes; False where nothing is pushed."""
        ...

    def close(self) -> None:
        ...


def check_label(label: str | None) -> str | None:
    """`label` itself, or a 422 naming the rule. A label of 8+ hex digits is refused: it would read as a prefix
    of some other version's fingerprint."""
    if label is None:
        return None
    if CLASS_NAME.fullmatch(label) is None:
        raise UnprocessableError(f"invalid model label {label[:80]!r}: use 1-64 characters of a-z, 0-9, '_', '.', "
                                 "'-', starting with a letter or digit")
    if len(label) >= MIN_PREFIX and _HEX.fullmatch(label):
        raise UnprocessableError(f"invalid model label {label!r}: it reads as a fingerprint prefix; add a letter "
                                 "beyond a-f")
    return label


def bundle_files(info: BundleInfo) -> list[str]:
    """The files that make the bundle: its weight files (sorted), then the manifest (written last)."""
    return [*sorted(info.files), MANIFEST]


def manifest_of(bundle_dir: Path) -> BundleInfo:
    """The bundle's manifest (its fingerprint), or a 422 with the BundleError's line."""
    try:
        return read_manifest(bundle_dir)
    except BundleError as e:
        raise UnprocessableError(str(e)) from None


def check_bundle(bundle_dir: Path, verify: bool) -> tuple[BundleInfo, int]:
    """The bundle's manifest and the bytes of its weight files, once it passed the checks: with `verify`,
    `load_bundle` (every file's hash, every tensor's name and shape against its config); without it, the manifest
    and every file's size and hash. UnprocessableError with the BundleError's line otherwise."""
    try:
        if verify:
            import torch

            _, info = load_bundle(bundle_dir, torch.device("cpu"))
        else:
            info = read_manifest(bundle_dir)
            for name, meta in info.files.items():
                path = info.path / name
                if not path.is_file():
                    raise BundleError(f"{path}: missing weight file")
                if "bytes" in meta and path.stat().st_size != meta["bytes"]:
                    raise BundleError(f"{path}: {path.stat().st_size} bytes, the manifest says {meta['bytes']} "
                                      "(truncated or replaced)")
                if sha256_file(path) != meta["sha256"]:
                    raise BundleError(f"{path}: sha256 does not match the manifest (corrupted or tampered with)")
    except BundleError as e:
        raise UnprocessableError(str(e)) from None
    size = sum((info.path / name).stat().st_size for name in info.files)
    return info, size


def find_version(versions: Iterable[ModelVersion], version: str) -> ModelVersion:
    """`resolve` over a list: the label first, then the full fingerprint, then a unique prefix."""
    versions = list(versions)
    for v in versions:
        if v.label is not None and v.label == version:
            return v
    for v in versions:
        if v.fingerprint == version:
            return v
    if len(version) >= MIN_PREFIX and _HEX.fullmatch(version):
        hits = [v for v in versions if v.fingerprint.startswith(version)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ModelNotFoundError(f"model version {version!r} is ambiguous: {len(hits)} fingerprints start "
                                     "with it; give more digits")
    raise ModelNotFoundError(f"no model version {version[:80]!r}: give a label, a fingerprint or at least "
                             f"{MIN_PREFIX} of its hex digits")


_FINGERPRINTS = ("active", "previous", "target", "shadow")


def check_state_changes(state: ServingState, known: set[str], expect_revision: int | None, changes: dict[str, Any]
                        ) -> ServingState:
    """The state after `changes` (its revision bumped), once they are valid: known fields, stored fingerprints,
    a share in [0, 1], and the revision the caller expects."""
    unknown = set(changes) - set(_FINGERPRINTS) - {"shadow_share"}
    if unknown:
        raise ValueError(f"unknown serving state fields: {sorted(unknown)}")
    if expect_revision is not None and expect_revision != state.revision:
        raise ConflictError(f"the serving state changed meanwhile (revision {state.revision}, expected "
                            f"{expect_revision}): look again")
    for name in _FINGERPRINTS:
        fp = changes.get(name)
        if fp is not None and fp not in known:
            raise ModelNotFoundError(f"no model version {str(fp)[:16]!r} for the serving state's {name}")
    share = changes.get("shadow_share")
    if share is not None and not 0.0 <= float(share) <= 1.0:
        raise UnprocessableError(f"shadow share {share} is not within 0..1")
    if share is not None:
        changes = {**changes, "shadow_share": float(share)}
    return replace(state, **changes, revision=state.revision + 1)


def clean_leftovers(folder: Path, stale_s: float = 3600.0) -> None:
    """Remove what a crash left in `folder`: interrupted removals (.trash-*), and incoming copies (.incoming-*)
    older than `stale_s` (younger ones may be another process's add in progress)."""
    if not folder.is_dir():
        return
    now = time.time()
    for entry in folder.iterdir():
        try:
            stale = entry.name.startswith(".incoming-") and now - entry.stat().st_mtime > stale_s
        except FileNotFoundError:  # renamed into place or removed meanwhile
            continue
        if entry.name.startswith(".trash-") or stale:
            log.warning("models: removing %s, left by an interrupted add or remove", entry)
            shutil.rmtree(entry, ignore_errors=True)


def removal_conflict(state: ServingState, fingerprint: str, version: str) -> None:
    """ConflictError when the state still needs `fingerprint`."""
    for name in ("active", "target", "shadow"):
        if getattr(state, name) == fingerprint:
            raise ConflictError(f"model {version} is the {name} model: "
                                + ("activate another version first" if name != "shadow" else "stop the shadow first"))
