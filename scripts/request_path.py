"""Which service modules one request runs through: the modules whose code executes (sys.setprofile, on the event
loop and in fresh worker threads) while a single process answers POST /predict.

    python3 scripts/request_path.py --bundle BUNDLE [--keep]

Prints the modules in the order first entered, and the count. docs/architecture.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from asgi_lifespan import LifespanManager
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:  # the layered service
    from service.core.settings import Settings
    from service.http.app import create_app
except ImportError:  # the flat one before it, for the comparison
    from service.app import create_app  # type: ignore[no-redef]
    from service.settings import Settings  # type: ignore[no-redef]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def _trace(bundle: Path, keep: bool) -> list[str]:
    app = create_app(Settings(bundle=bundle, data_dir=Path(tempfile.mkdtemp()), device="cpu"))
    entered: dict[str, None] = {}

    def profile(frame, event, _arg):
        if event != "call":
            return
        path = frame.f_code.co_filename
        if not path.startswith(str(ROOT / "service")):
            return
        entered.setdefault(Path(path).relative_to(ROOT).with_suffix("").as_posix().replace("/", "."), None)

    async with LifespanManager(app, startup_timeout=60):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60)
        for _ in range(600):
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        files = [("images", (f"{i}.png", _png(i), "image/png")) for i in range(3)]
        assert (await http.post("/classes/widget/shots", files=files)).status_code == 200
        form = {"class_name": "widget", "heatmap": "png", **({"keep": "true"} if keep else {})}
        one = [("images", ("t.png", _png(9), "image/png"))]
        assert (await http.post("/predict", files=one, data=form)).status_code == 200  # warm: imports, caches
        sys.setprofile(profile)
        threading.setprofile(profile)
        # threads made from now on are traced: a fresh pool for asyncio.to_thread (the engine's thread is not)
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(4))
        try:
            r = await http.post("/predict", files=one, data=form)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
        assert r.status_code == 200, r.text
    return list(entered)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--keep", action="store_true", help="keep=true: the result is kept for the console")
    args = p.parse_args()
    modules = asyncio.run(_trace(args.bundle, args.keep))
    print(f"{len(modules)} service modules: {', '.join(modules)}")


if __name__ == "__main__":
    main()
