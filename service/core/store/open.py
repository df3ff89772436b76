"""open_store(url): the ClassStore a URL names. `file://DIR` or a plain path: the directory store (the embedded
default); `postgresql://...` (or `postgres://`): the PostgreSQL store, imported only then."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from .base import ClassStore
from .directory import DirectoryStore

__all__ = ["directory_of", "is_postgres_url", "open_store", "store_kind"]


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def store_kind(url: str | Path) -> str:
    return "postgresql" if is_postgres_url(str(url)) else "directory"


def open_store(url: str | Path) -> ClassStore:
    """The store of `url` (see the module docstring); ValueError for a scheme it does not know."""
    text = str(url)
    if is_postgres_url(text):
        from .postgres import PostgresStore

        return PostgresStore(text)
    return DirectoryStore(directory_of(text))


def directory_of(url: str | Path) -> Path:
    """The data directory a directory store's URL names (a plain path or file://DIR); ValueError otherwise."""
    text = str(url)
    if text.startswith("file://"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// store URLs name a local directory, not host {parts.netloc!r}")
        return Path(unquote(parts.path))
    if "://" in text:
        raise ValueError(f"unknown store URL scheme {text.split('://')[0]!r}: use a directory, file:// or "
                         "postgresql://")
    return Path(text)
