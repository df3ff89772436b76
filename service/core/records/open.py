"""open_recorder: the recorder of a service's settings, its store beside the class store.

A directory class store: SQLite and image files in `records_dir` (default: data_dir/records, beside the classes).
A PostgreSQL class store: tables in the same database. The spool is always local (`records_dir/spool`): it is what
an answer waits for, so it must not wait on a network.
"""

from __future__ import annotations

from pathlib import Path

from ..settings import Settings
from ..store.open import directory_of, is_postgres_url
from .recorder import Recorder
from .spool import Spool
from .store import RecordStore, Retention

__all__ = ["open_recorder", "records_directory"]

DAY = 86400.0


def records_directory(settings: Settings) -> Path:
    if settings.records_dir is not None:
        return settings.records_dir
    url = settings.store_url
    return (settings.data_dir if is_postgres_url(url) else directory_of(url)) / "records"


def open_recorder(settings: Settings) -> Recorder:
    """The recorder (not started: `Recorder.start`, blocking, takes up the spool and starts its threads)."""
    s, url = settings, settings.store_url
    directory = records_directory(s)

    def open_store() -> RecordStore:
        if is_postgres_url(url):
            from .postgres import PostgresRecordStore

            return PostgresRecordStore(url)
        from .sqlite import SqliteRecordStore

        return SqliteRecordStore(directory)

    retention = Retention(max_age_s=s.records_max_age_days * DAY, max_records=s.records_max_count,
                          image_max_age_s=s.record_images_max_age_days * DAY,
                          image_max_bytes=int(s.record_images_max_mb * 2**20))
    return Recorder(open_store, Spool(directory / "spool"), int(s.record_spool_max_mb * 2**20), retention,
                    s.records_sweep_s, s.unrecordable)
