"""/ui: the inspection console, static files served by the service itself (no CDN, no build step).

The files hold no data, so they load without the API key; `/ui/config.json` says whether the API needs one, so
the page asks for it before its first call instead of after a 401, and gives the heatmap colour ramp
(`model.postprocess.HEAT_RAMP`), so the console colours maps as the thumbnails and `sowa demo` do.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from model.postprocess import HEAT_RAMP

from ..deps import RuntimeDep

__all__ = ["CONSOLE_DIR", "mount_console"]

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"

router = APIRouter(tags=["console"])


@router.get("/ui/config.json", summary="What the console needs to know before its first call")
async def console_config(runtime: RuntimeDep) -> dict:
    return {"api_key_required": runtime.keys.required, "heat_ramp": [list(rgb) for rgb in HEAT_RAMP]}


@router.get("/ui", include_in_schema=False)
async def console_root() -> RedirectResponse:
    return RedirectResponse("/ui/")


def mount_console(app: FastAPI) -> None:
    """The console's files at /ui (its router, /ui/config.json, is included with the others)."""
    app.mount("/ui", StaticFiles(directory=CONSOLE_DIR, html=True), name="console")
