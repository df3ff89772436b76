"""The inspection record: what the service remembers of one scored image, and the metadata a client sends with it.

A record holds the numbers of the answer (score, normalised score, text score, verdict, regions, the threshold in
force and whether it was the request's own), what produced them (the class's revision: a digest of its shots, and
the bundle fingerprint: which model), the image's name and size, and the client's `part_id`, `station` and `tags`.
Its upload and heatmap thumbnail are kept by the retention policy (service/core/records/retention.py), so the
digests may be None. Ids are time-ordered (UUIDv7-shaped hex): they sort as the parts were scored, which is what
the keyset pagination of GET /records walks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ..errors import UnprocessableError

__all__ = ["COLUMNS", "MAX_TAGS", "MAX_TEXT", "NAMES", "REVIEWS", "Draft", "Record", "RecordMeta", "Review", "Sampler",
           "clean_filename", "shots_revision"]

MAX_TEXT = 128  # characters of part_id and station
MAX_TAGS = 16
MAX_TAG = 64
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+=-]{0,63}$")  # no comma: tags are stored as ",a,b,"
REVIEWS = ("good", "defective")
Review = Literal["good", "defective"]


def shots_revision(shots: Sequence[str]) -> str:
    """A class's revision as records name it: a digest of its shots (hashes, in order). A raw score depends on the
    shots it was scored against and nothing else of the class (a threshold override changes the verdict, not the
    score), so records of one revision are comparable; the same shots give the same revision on every replica."""
    return hashlib.sha256("\n".join(shots).encode()).hexdigest()[:16]


def _text(name: str, value: str | None) -> str | None:
    """A client's free text (part_id, station): at most MAX_TEXT characters, no control or invisible formatting
    characters; anything else (HTML included) is kept as plain text, never interpreted."""
    if value is None or value == "":
        return None
    if len(value) > MAX_TEXT:
        raise UnprocessableError(f"{name} is {len(value)} characters long; at most {MAX_TEXT}")
    bad = next((c for c in value if unicodedata.category(c)[0] == "C"), None)
    if bad is not None:
        raise UnprocessableError(f"{name} holds a control character (U+{ord(bad):04X}); send printable text only")
    if value != value.strip():
        raise UnprocessableError(f"{name} starts or ends with white space")
    return value


def clean_filename(name: str) -> str:
    """An upload's name as a record keeps it: at most 255 characters, control characters as U+FFFD (a client's
    name is stored, never trusted: it is shown as text and never becomes a path)."""
    return "".join("\ufffd" if unicodedata.category(c)[0] == "C" else c for c in name[:255])


@dataclass(frozen=True)
class RecordMeta:
    """What a client says about a part with /predict: checked here, so nothing unbounded reaches a store."""

    part_id: str | None = None
    station: str | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def of(cls, part_id: str | None, station: str | None, tags: Sequence[str] | None) -> RecordMeta:
        """Checked metadata (UnprocessableError, 422, saying what is wrong); `tags` may each hold several,
        comma-separated. Duplicates are dropped, order kept."""
        split = [t.strip() for raw in (tags or ()) for t in raw.split(",") if t.strip()]
        if len(split) > MAX_TAGS:
            raise UnprocessableError(f"{len(split)} tags; at most {MAX_TAGS}")
        for t in split:
            if not _TAG.match(t):
                raise UnprocessableError(f"tag {t[:MAX_TAG]!r} is not 1 to {MAX_TAG} letters, digits or _.:/@+=- "
                                         "(starting with a letter or digit)")
        return cls(_text("part_id", part_id), _text("station", station), tuple(dict.fromkeys(split)))


@dataclass(frozen=True)
class Record:
    """One inspection as stored (see the module docstring). `review` is None until someone reviewed the part."""

    id: str
    time: float
    class_name: str
    revision: str  # the class's shots (shots_revision): which calibration scored it
    model: str  # the bundle fingerprint (16 hex digits, as the answer's `model.fingerprint`)
    threshold: float
    threshold_per_request: bool  # the request's own threshold, not the class's
    score: float
    normalized_score: float
    text_score: float
    is_anomalous: bool
    filename: str
    width: int
    height: int
    regions: list[dict[str, Any]] = field(default_factory=list)
    part_id: str | None = None
    station: str | None = None
    tags: tuple[str, ...] = ()
    image_sha256: str | None = None  # the upload as sent, when kept
    thumbnail_sha256: str | None = None  # JPEG, heatmap blended over, when kept
    image_bytes: int = 0  # bytes of the kept image and thumbnail (retention's byte budget counts them)
    review: str | None = None  # "good" | "defective"
    review_note: str | None = None
    reviewed_by: str | None = None
    reviewed_at: float | None = None

    @property
    def verdict(self) -> str:
        return "fail" if self.is_anomalous else "pass"

    @property
    def kept_image(self) -> bool:
        return self.image_sha256 is not None

    def row(self) -> tuple[Any, ...]:
        """The record as a row in COLUMNS order: regions as JSON text, tags as ',a,b,' (a tag filter is then a
        substring search for ',tag,', portable across SQLite and PostgreSQL)."""
        d = {name: getattr(self, name) for name in NAMES}  # not asdict: it deep-copies, a third of a batch's time
        d["regions"] = json.dumps(self.regions, separators=(",", ":"))
        d["tags"] = "," + ",".join(self.tags) + "," if self.tags else ""
        return tuple(d.values())

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Record:
        d = dict(zip(NAMES, row, strict=True))
        d["regions"] = json.loads(d["regions"]) if d["regions"] else []
        d["tags"] = tuple(t for t in (d["tags"] or "").split(",") if t)
        d["is_anomalous"], d["threshold_per_request"] = bool(d["is_anomalous"]), bool(d["threshold_per_request"])
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        """The record as the API answers it (JSON)."""
        d = asdict(self)
        d["tags"] = list(self.tags)
        d["verdict"] = self.verdict
        d["image_kept"] = self.image_sha256 is not None
        d["thumbnail_kept"] = self.thumbnail_sha256 is not None
        return d


NAMES: tuple[str, ...] = tuple(f.name for f in fields(Record))
COLUMNS = ", ".join(NAMES)


@dataclass(frozen=True)
class Draft:
    """A record on its way to the spool: its numbers (the id is given when it is spooled) and, when the retention
    policy keeps them, the upload's bytes and the thumbnail's."""

    record: Record
    image: bytes | None = None
    thumbnail: bytes | None = None


class Sampler:
    """Which records keep their images: every flagged part, 1 in `passed_every` passed parts (0: none)."""

    def __init__(self, passed_every: int) -> None:
        self.passed_every = passed_every
        self._passed = itertools.count()  # next() is atomic under the GIL: safe from the decode threads

    def keeps(self, flagged: bool) -> bool:
        if flagged:
            return True
        return self.passed_every > 0 and next(self._passed) % self.passed_every == 0
