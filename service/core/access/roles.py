"""Roles and principals: what a request's key may do.

Three roles, each including the one below: `inspect` scores parts and reads classes and results; `operate` also
registers shots and sets thresholds; `admin` also deletes classes and manages keys and reads the audit trail. A
key may be limited to the classes whose names match a pattern (shell-style: `line1-*`).
"""

from __future__ import annotations

import enum
import fnmatch
import re
from dataclasses import dataclass

__all__ = ["ANONYMOUS", "CLASS_PATTERN", "LEGACY_KEY_NAME", "Principal", "Role", "check_class_pattern"]

# a class-name pattern: class-name characters and the shell wildcards * ? [ ]
CLASS_PATTERN = re.compile(r"^[a-z0-9_.\-*?\[\]]{1,64}$")
LEGACY_KEY_NAME = "SOWA_API_KEY"  # the single configured key, an admin, as the audit trail names it


class Role(str, enum.Enum):
    INSPECT = "inspect"
    OPERATE = "operate"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def includes(self, other: Role) -> bool:
        return self.rank >= other.rank


_RANK = {Role.INSPECT: 0, Role.OPERATE: 1, Role.ADMIN: 2}


def check_class_pattern(pattern: str) -> str:
    """ValueError unless `pattern` can name classes (see CLASS_PATTERN)."""
    if not CLASS_PATTERN.match(pattern):
        raise ValueError(f"class pattern {pattern[:80]!r}: use 1-64 of a-z, 0-9, '_', '.', '-' and * ? [ ]")
    return pattern


@dataclass(frozen=True)
class Principal:
    """The caller, as its key says: a name (what the audit trail records), a role, and the classes it may touch
    (None: all)."""

    name: str
    role: Role
    classes: str | None = None

    def may(self, role: Role) -> bool:
        return self.role.includes(role)

    def may_touch(self, class_name: str) -> bool:
        return self.classes is None or fnmatch.fnmatchcase(class_name, self.classes)


ANONYMOUS = Principal("anonymous", Role.ADMIN)  # no key configured anywhere: the service is open, as before keys
