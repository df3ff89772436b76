"""Schema versions of the service's own SQLite databases (access, records): `PRAGMA user_version` counts the
migrations applied, each applied in the one transaction that moves the version, so a crash leaves either version."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

__all__ = ["migrate"]


def migrate(db: sqlite3.Connection, migrations: Mapping[int, str], what: str) -> None:
    """Apply `migrations` (version -> `;`-separated statements, from 1) past the database's version; refuse a
    database newer than the last one (`what` names it in the error)."""
    latest = max(migrations)
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > latest:
            raise RuntimeError(f"{what}: schema version {version} is newer than this service knows ({latest})")
        for v in range(version + 1, latest + 1):
            for statement in migrations[v].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {v}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
