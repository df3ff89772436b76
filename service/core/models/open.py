"""open_repository(store_url, data_dir): the model repository beside the class store a URL names, the directory
one for a directory store (in the data directory the URL names) or the PostgreSQL one (imported only then)."""

from __future__ import annotations

from pathlib import Path

from ..store.open import directory_of, is_postgres_url
from .repository import ModelRepository

__all__ = ["open_repository"]


def open_repository(store_url: str, data_dir: Path) -> ModelRepository:
    """A directory store's URL names the data directory; a PostgreSQL repository keeps its local copies of
    bundles (`path`) under `data_dir`."""
    if is_postgres_url(store_url):
        from .postgres import PostgresModelRepository

        return PostgresModelRepository(store_url, Path(data_dir))
    from .directory import DirectoryModelRepository

    return DirectoryModelRepository(directory_of(store_url))
