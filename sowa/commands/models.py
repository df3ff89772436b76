"""`sowa models add|list|activate|rollback|shadow|remove`: model versions in the repository the service uses (a
data directory, or PostgreSQL beside the class store).

The CLI only changes the repository and its serving state; running services follow it (PostgreSQL pushes the
change, a data directory is looked at every sync interval) and do the work themselves: `activate` asks them to
switch (each prepares the version's banks, then switches between two batches; /models shows the progress),
`rollback` asks for the previous version back, `shadow` has a candidate score a share of the traffic beside the
serving model. A version is named by its label, its fingerprint, or at least 8 of the fingerprint's hex digits.
The CLI acts as the operator at the machine, `cli:<user>`; activations, rollbacks and shadow changes go to the
audit trail as they do through the API.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sowa.arguments import add_store_location, store_location

if TYPE_CHECKING:
    from service.core.access.audit import AuditEvent
    from service.core.models.repository import ModelRepository

DESCRIPTION = __doc__

__all__ = ["add_arguments", "run"]


def add_arguments(c: argparse.ArgumentParser) -> None:
    add_store_location(c)
    sub = c.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    a = sub.add_parser("add", help="check a bundle and store it as a version")
    a.add_argument("bundle", type=Path, help="the bundle directory")
    a.add_argument("--label", default=None, help="a name for the version (a-z, 0-9, _ . -), unique")
    sub.add_parser("list", help="list versions as JSON lines, oldest first, with the serving state")
    v = sub.add_parser("activate", help="make running services switch to a version")
    v.add_argument("version")
    sub.add_parser("rollback", help="make running services switch back to the previous version")
    s = sub.add_parser("shadow", help="have a version score a share of the traffic beside the serving one")
    s.add_argument("version", nargs="?", default=None)
    s.add_argument("--share", type=float, default=0.05, help="the share of answered requests it scores (0..1; "
                   "as the service's default shadow_share)")
    s.add_argument("--off", action="store_true", help="stop shadowing")
    r = sub.add_parser("remove", help="remove a version (not the active, target or shadow one)")
    r.add_argument("version")


def run(args: argparse.Namespace) -> int:
    from service.core.errors import SowaError
    from service.core.models.open import open_repository

    actor = f"cli:{getpass.getuser()}"
    try:
        repository = open_repository(*store_location(args))
    except (SowaError, RuntimeError) as e:
        raise ValueError(getattr(e, "message", str(e))) from None
    try:
        event = _act(repository, args, actor)
        if event is not None:
            from service.core.access.store import open_access

            access = open_access(store_location(args)[0])
            try:
                access.append([event])
            finally:
                access.close()
    except SowaError as e:  # a taken label, an unknown version, a broken bundle, the store unreachable
        raise ValueError(e.message) from None
    finally:
        repository.close()
    return 0


def _act(repository: ModelRepository, args: argparse.Namespace, actor: str) -> AuditEvent | None:
    """Do the command; the audit event it makes, if any."""
    from service.core.access.audit import AuditEvent
    from service.core.errors import ModelNotFoundError

    command = args.models_command

    def name(fp: str | None) -> str | None:
        if fp is None:
            return None
        try:
            return repository.resolve(fp).version
        except ModelNotFoundError:  # removed meanwhile
            return fp[:16]

    if command == "add":
        v = repository.add(args.bundle, args.label, actor)
        print(json.dumps(v.public()))
    elif command == "list":
        state = repository.state()
        for v in repository.list():
            roles = {role: getattr(state, role) == v.fingerprint for role in ("active", "previous", "target", "shadow")}
            share = {"shadow_share": state.shadow_share} if roles["shadow"] else {}
            print(json.dumps({**v.public(), **roles, **share}))
    elif command == "activate":
        v = repository.resolve(args.version)
        state = repository.state()
        if v.fingerprint == state.active and state.target in (None, v.fingerprint):
            if state.target is not None:
                repository.set_state(state.revision, target=None)
            print(f"{v.version} is the active version")
            return None
        repository.set_state(state.revision, target=v.fingerprint)
        print(f"activating {v.version}: running services switch to it (see GET /models)")
        return AuditEvent(actor, "model.activated", v.version, {"active": name(state.active)}, {"active": v.version})
    elif command == "rollback":
        state = repository.state()
        if state.previous is None:
            raise ValueError("there is no previous model to roll back to")
        v = repository.resolve(state.previous)
        repository.set_state(state.revision, target=v.fingerprint)
        print(f"rolling back to {v.version}: running services switch to it (see GET /models)")
        return AuditEvent(actor, "model.activated", v.version, {"active": name(state.active)}, {"active": v.version})
    elif command == "shadow":
        if args.off == (args.version is not None):
            raise ValueError("give a VERSION to shadow, or --off")
        if args.off:
            state = repository.state()
            repository.set_state(state.revision, shadow=None, shadow_share=0.0)
            print("shadow off")
            if state.shadow is None:
                return None  # nothing shadowed: nothing changed
            return AuditEvent(actor, "model.shadow", name(state.shadow) or "-", {"shadow": name(state.shadow)}, None)
        if not 0.0 < args.share <= 1.0:
            raise ValueError(f"--share {args.share} is not within (0, 1]")
        v = repository.resolve(args.version)
        state = repository.state()
        if v.fingerprint == (state.target or state.active):
            raise ValueError(f"model {v.version} is the one serving: shadow another version")
        repository.set_state(state.revision, shadow=v.fingerprint, shadow_share=args.share)
        print(f"{v.version} shadows {100 * args.share:g}% of the traffic")
        return AuditEvent(actor, "model.shadow", v.version, {"shadow": name(state.shadow)},
                          {"shadow": v.version, "share": args.share})
    else:
        from service.core.store import open_store

        v = repository.resolve(args.version)
        repository.remove(v.fingerprint)
        store = open_store(store_location(args)[0])  # its banks go too (threshold overrides stay, if it comes back)
        try:
            dropped = store.drop_model(v.fingerprint)
        finally:
            store.close()
        print(f"removed {v.version} and its banks of {dropped} classes")
    return None
