"""/ui: the inspection console, static files served by the service itself (no CDN, no build step).

The files hold no data, so they load without the API key; `/ui/config.json` says whether the API needs one, so
the page asks for it before its first call instead of after a 401, and gives the heatmap colour ramp
(`model.postprocess.HEAT_RAMP`), so the console colours maps as the thumbnails and `sowa demo` do, and the
audit trail's actions (its filter lists every one the service records).

/docs is Swagger UI from an installed package's files (fastapi-offline's, at /ui/vendor/), not FastAPI's page,
which pulls unpinned scripts from a CDN onto this origin and starts them with an inline script the
Content-Security-Policy refuses (service/http/protections.py). ReDoc is not served: one API page is enough.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from model.postprocess import HEAT_RAMP

from ...core.access.audit import ACTIONS
from ..deps import RuntimeDep

__all__ = ["CONSOLE_DIR", "mount_console"]

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
VENDOR_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"  # swagger-ui-bundle.js, swagger-ui.css
# relative URLs: right behind a path prefix too; the script that starts Swagger UI is a file (no inline script)
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SOWA inspection service: API</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="ui/vendor/swagger-ui.css">
<script src="ui/vendor/swagger-ui-bundle.js" defer></script><script src="ui/docs.js" defer></script>
</head><body><div id="swagger-ui"></div></body></html>
"""

router = APIRouter(tags=["console"])


@router.get("/ui/config.json", summary="What the console needs to know before its first call")
async def console_config(runtime: RuntimeDep) -> dict:
    return {"api_key_required": runtime.keys.required, "heat_ramp": [list(rgb) for rgb in HEAT_RAMP],
            "audit_actions": list(ACTIONS)}


@router.get("/ui", include_in_schema=False)
async def console_root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/docs", include_in_schema=False)
async def api_docs() -> HTMLResponse:
    return HTMLResponse(DOCS_PAGE)


def mount_console(app: FastAPI) -> None:
    """The console's files at /ui (its router, /ui/config.json, is included with the others)."""
    app.mount("/ui/vendor", StaticFiles(directory=VENDOR_DIR), name="vendor")  # before /ui, which would take it
    app.mount("/ui", StaticFiles(directory=CONSOLE_DIR, html=True), name="console")
