"""A request's multipart files as plain `(filename, bytes)` pairs, for `service.core.uploads`."""

from __future__ import annotations

from fastapi import UploadFile

from ...core.uploads import Upload, check_count

__all__ = ["read_files"]


async def read_files(files: list[UploadFile], limit: int) -> list[Upload]:
    """The files' bytes, refused with a 422 before any is read when there are more than `limit`."""
    check_count(len(files), limit)
    return [(f.filename or f"image-{i}", await f.read()) for i, f in enumerate(files)]
