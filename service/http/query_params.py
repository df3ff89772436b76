"""Query parameters a route knows: the rest refused, so a misspelt filter (`?part=4711`, `?actr=ops`) never silently
widens a query or an export to everything."""

from __future__ import annotations

from fastapi import Depends, Request

from ..core.errors import UnprocessableError

__all__ = ["only_params"]


def only_params(*names: str) -> object:
    """A route dependency: 422 for a query parameter not in `names`, or one given more than once."""
    known = frozenset(names)

    async def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            raise UnprocessableError(f"unknown query parameter(s) {', '.join(unknown)[:200]!r}; known: "
                                     f"{', '.join(sorted(known))}")
        repeated = sorted(k for k in request.query_params if len(request.query_params.getlist(k)) > 1)
        if repeated:
            raise UnprocessableError(f"query parameters given more than once: {', '.join(repeated)[:200]}")

    return Depends(check)
