"""API keys: list, add (the key is shown once), revoke; and who the caller is (`/auth/me`).

Keys are an admin's to manage; each change is one audit event, written with the key in one transaction.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from ...core.access.audit import AuditEvent
from ...core.access.keys import KEY_NAME, new_key
from ...core.access.roles import Role, check_class_pattern
from ...core.errors import NotReadyError, UnprocessableError
from ..auth import PrincipalDep, Requires
from ..deps import RuntimeDep
from ..schemas import KeyCreated, KeyInfo, KeyList, KeyRequest, Me

__all__ = ["me_router", "router"]

router = APIRouter(prefix="/keys", tags=["keys"], dependencies=[Depends(Requires(Role.ADMIN))])
me_router = APIRouter(tags=["keys"], dependencies=[Depends(Requires(Role.INSPECT))])

KeyName = Annotated[str, Path(pattern=KEY_NAME.pattern, description="the key's name")]  # not `name`: that is a class


def _store(runtime: RuntimeDep):
    if runtime.access is None:
        raise NotReadyError("the key store is not open yet; see /readyz", headers={"Retry-After": "5"})
    return runtime.access


@router.get("", response_model=KeyList, summary="List API keys (never their secrets)")
async def list_keys(runtime: RuntimeDep) -> dict:
    keys = await asyncio.to_thread(_store(runtime).list_keys)
    return {"keys": [k.public() for k in keys]}


@router.post("", response_model=KeyCreated, status_code=201, summary="Add an API key: the answer shows it once")
async def add_key(request: KeyRequest, runtime: RuntimeDep, principal: PrincipalDep) -> dict:
    try:
        classes = None if request.classes is None else check_class_pattern(request.classes)
        text, record = new_key(request.name, Role(request.role), classes, principal.name)
    except ValueError as e:
        raise UnprocessableError(str(e)) from None
    event = AuditEvent(principal.name, "key.added", record.name, None, record.public())
    await asyncio.to_thread(_store(runtime).add_key, record, event)
    runtime.keys.invalidate()
    return {"key": text, **record.public()}


@router.delete("/{key_name}", response_model=KeyInfo, summary="Revoke an API key, on every replica within a second")
async def revoke_key(key_name: KeyName, runtime: RuntimeDep, principal: PrincipalDep) -> dict:
    name = key_name
    store = _store(runtime)
    before = next((k for k in await asyncio.to_thread(store.list_keys) if k.name == name), None)
    event = AuditEvent(principal.name, "key.revoked", name, before.public() if before else None, None)
    record = await asyncio.to_thread(store.revoke_key, name, principal.name, event)
    runtime.keys.invalidate()
    return {**record.public(), "revoked": event.time, "revoked_by": principal.name}


@me_router.get("/auth/me", response_model=Me, summary="The caller: its key's name, role and classes")
async def me(principal: PrincipalDep, runtime: RuntimeDep) -> dict:
    return {"name": principal.name, "role": principal.role.value, "classes": principal.classes,
            "keys_required": runtime.keys.required,
            "may": {r.value: principal.may(r) for r in Role}}
