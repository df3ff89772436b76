"""What the PostgreSQL stores beside the classes (access, records, models) share: borrowing a pooled connection
(trouble becomes StoreUnavailableError, 503 + Retry-After, naming the store and what it was doing), and listening to
a NOTIFY channel on a connection of its own, reconnecting after a loss."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import StoreUnavailableError

__all__ = ["UNAVAILABLE", "listen", "pooled"]

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


def listen(conninfo: str, channel: str, stop: threading.Event, listening: threading.Event,
           changed: Callable[[], None], what: str, log: logging.Logger) -> None:
    """LISTEN on `channel` until `stop` (a thread's body): `changed()` on each notification, and once the connection
    is back after a loss (a change may have been missed). `listening` is set once listening, or once the first try
    failed (nobody waits for a database that is down). `channel` is a constant of the caller, never input."""
    backoff, lost = 0.2, False
    while not stop.is_set():
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(f"LISTEN {channel}")
                if lost:
                    log.warning("%s: reachable again", what)
                    changed()
                lost, backoff = False, 0.2
                listening.set()
                while not stop.is_set():
                    for _ in conn.notifies(timeout=0.5):
                        changed()
                    conn.execute("SELECT 1")  # a quiet line can be a dead one
        except Exception as e:
            if stop.is_set():
                return
            if not lost:
                log.error("%s: lost the listener (%s); retrying", what, str(e).strip()[:200])
            lost = True
            listening.set()
            stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)
