"""One way to borrow a pooled PostgreSQL connection for the stores beside the classes (access, records, models):
connection trouble becomes StoreUnavailableError (503 + Retry-After) naming the store and what it was doing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import StoreUnavailableError

__all__ = ["UNAVAILABLE", "pooled"]

UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


@contextmanager
def pooled(pool: ConnectionPool, store: str, what: str, writes: bool = True) -> Iterator[psycopg.Connection]:
    """A connection of `pool`. `writes`: the call may write, and a connection lost during COMMIT may have
    committed, so the error says to look before trying again rather than "nothing was changed"."""
    try:
        with pool.connection() as conn:
            yield conn
    except UNAVAILABLE as e:
        maybe = "; it may not have been applied: look before trying again" if writes else ""
        raise StoreUnavailableError(f"{store} cannot be reached ({what}: {str(e).strip()[:200]}){maybe}",
                                    headers={"Retry-After": "5"}) from None
