"""`sowa keys add|list|revoke`: API keys in the store the service uses (a data directory, or PostgreSQL).

`add` prints the key once: it is stored only as a hash. Keys are managed by whoever can write the store (the CLI
acts as the operator at the machine, recorded in the audit trail as `cli:<user>`); `/keys` does the same over
HTTP for an admin key. A revocation reaches every running replica within a second.
"""

from __future__ import annotations

import argparse
import getpass
import json

from sowa.arguments import add_store_location, store_location

DESCRIPTION = __doc__

__all__ = ["add_arguments", "run"]


def add_arguments(c: argparse.ArgumentParser) -> None:
    add_store_location(c)
    sub = c.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    a = sub.add_parser("add", help="make a key and print it (once)")
    a.add_argument("--name", required=True, help="what the audit trail calls its holder (a-z, 0-9, _ . -)")
    a.add_argument("--role", required=True, choices=["inspect", "operate", "admin"])
    a.add_argument("--classes", default=None, help="limit it to classes matching this pattern (e.g. 'line1-*')")
    sub.add_parser("list", help="list keys (never their secrets), as JSON lines")
    r = sub.add_parser("revoke", help="revoke a key by name")
    r.add_argument("name")


def run(args: argparse.Namespace) -> int:
    from service.core.access.audit import AuditEvent
    from service.core.access.keys import new_key
    from service.core.access.roles import Role, check_class_pattern
    from service.core.access.store import open_access
    from service.core.errors import SowaError

    actor = f"cli:{getpass.getuser()}"
    try:
        store = open_access(store_location(args)[0])
    except (SowaError, RuntimeError) as e:
        raise ValueError(str(e)) from None
    try:
        if args.keys_command == "add":
            classes = None if args.classes is None else check_class_pattern(args.classes)
            text, record = new_key(args.name, Role(args.role), classes, actor)
            store.add_key(record, AuditEvent(actor, "key.added", record.name, None, record.public()))
            print(text)
        elif args.keys_command == "list":
            for k in store.list_keys():
                print(json.dumps(k.public()))
        else:
            before = next((k for k in store.list_keys() if k.name == args.name), None)
            store.revoke_key(args.name, actor, AuditEvent(actor, "key.revoked", args.name,
                                                           before.public() if before else None, None))
            print(f"revoked {args.name}")
    except SowaError as e:  # a taken name, an unknown key, the store unreachable
        raise ValueError(e.message) from None
    finally:
        store.close()
    return 0
