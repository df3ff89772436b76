"""`sowa store migrate --from DIR --to URL`: copy a class store (today: a directory store into PostgreSQL).

Every class is copied whole (shots, times, and each model's bank, calibration and threshold override; a model's
override without a bank is not copied), under the target's class lock: replicas may already serve from it. A class
the target already holds is an error unless --replace; damaged source classes are skipped and named.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__

__all__ = ["add_arguments", "migrate", "run"]


def add_arguments(c: argparse.ArgumentParser) -> None:
    sub = c.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    m = sub.add_parser("migrate", help="copy every class of one store into another")
    m.add_argument("--from", dest="source", required=True, help="source store: a directory (or file://DIR)")
    m.add_argument("--to", dest="target", required=True, help="target store: postgresql://user@host/db (prefer "
                   "the PGPASSWORD variable to a password in the URL) or a directory")
    m.add_argument("--replace", action="store_true", help="overwrite classes the target already holds")


def migrate(source_url: str, target_url: str, replace: bool = False) -> tuple[list[str], dict[str, str]]:
    """Copy every class of `source_url` into `target_url`: (names copied, {name: why skipped})."""
    from service.core.store import open_store

    source, target = open_store(source_url), open_store(target_url)
    copied: list[str] = []
    try:
        skipped = dict(source.recover())
        target.recover()
        names = source.changes().changed
        present = [n for n in names if target.read(n, None) is not None]
        if present and not replace:
            raise ValueError(f"the target already holds {len(present)} of these classes ({', '.join(present[:5])}"
                             f"{'...' if len(present) > 5 else ''}): pass --replace to overwrite them")
        for name in names:
            try:
                head = source.read(name, None)
                if head is None:
                    continue
                records = [source.read(name, fp) for fp in head.models]
                if not records or any(r is None or r.memory is None for r in records):
                    skipped[name] = "a bank is unreadable: re-register it, or let a replica rebuild it first"
                    continue
                shots = {h: source.read_shot(name, h) for h in head.shots}
            except (ValueError, OSError) as e:
                skipped[name] = str(e)
                continue
            with target.lock(name):
                target.write(records[0], shots)  # the class, with its first model's bank; then the others'
                for r in records[1:]:
                    target.write_bank(name, r.bundle_fingerprint, r.memory, r.shots)
                    if r.threshold_override is not None:
                        target.write(r, {})
            copied.append(name)
    finally:
        for store in (source, target):
            getattr(store, "close", lambda: None)()
    return copied, skipped


def run(args: argparse.Namespace) -> int:
    from service.core.errors import SowaError

    try:
        copied, skipped = migrate(args.source, args.target, args.replace)
    except (SowaError, RuntimeError) as e:  # the store unreachable, a schema this release does not know
        raise ValueError(str(e)) from None
    for name, why in sorted(skipped.items()):
        print(f"skipped {name}: {why}")
    print(f"{len(copied)} classes copied, {len(skipped)} skipped")
    return 0 if not skipped else 1
