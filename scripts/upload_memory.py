"""Peak host memory of a real server process while it decodes hostile uploads (docs/service.md, "Memory per upload").

Starts `sowa serve` on the parity bundle (tests/data/golden) on the CPU, resets the process's peak RSS (VmHWM, via
/proc/PID/clear_refs; Linux, as root or the same user), posts one upload, reads VmHWM, and so on for each case;
prints bytes of peak growth per image pixel. Run from the checkout:

    python scripts/upload_memory.py [--pixels 25000000] [--concurrent 4] [--decode-memory-mb 1024]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint_import import import_to_bundle  # noqa: E402
from sowa.server_process import ServerProcess  # noqa: E402

__all__ = ["hostile_uploads", "main"]


def hostile_uploads(pixels: int) -> dict[str, bytes]:
    """Small files that decode to `pixels` pixels in the modes that cost the most memory."""
    side = int(pixels ** 0.5)
    ramp = (np.arange(side, dtype=np.uint32)[None, :] * 65535 // side).astype(np.uint16).repeat(side, 0)
    out = {}
    for name, img, fmt in [
        ("grey16.png", Image.fromarray(ramp), "PNG"),
        ("float32.tiff", Image.fromarray(ramp.astype(np.float32)), "TIFF"),
        ("int32.tiff", Image.fromarray(ramp.astype(np.int32)), "TIFF"),
        ("rgba.png", Image.new("RGBA", (side, side), (10, 20, 30, 40)), "PNG"),
        ("cmyk.jpg", Image.new("CMYK", (side, side), (10, 20, 30, 40)), "JPEG"),
        ("palette.gif", Image.new("P", (side, side), 3), "GIF"),
        ("rgb.jpg", Image.new("RGB", (side, side), (10, 20, 30)), "JPEG"),
    ]:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"compression": "tiff_adobe_deflate"} if fmt == "TIFF" else {}))
        out[name] = buf.getvalue()
    return out


def _post(url: str, name: str, data: bytes) -> int:
    return httpx.post(url + "/predict", files={"images": (name, data)}, data={"heatmap": "none"},
                      timeout=300).status_code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", type=int, default=25_000_000)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--decode-memory-mb", type=float, default=1024)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        bundle = w / "bundle"
        import_to_bundle(next((REPO / "tests/data/golden/parity_tiny").glob("*.ckpt")), bundle, taps=None,
                         text_heads=None, temperature=0.07)
        uploads = hostile_uploads(a.pixels)
        side = int(a.pixels ** 0.5)
        px = side * side
        env = {"SOWA_DECODE_MEMORY_MB": str(a.decode_memory_mb), "SOWA_MAX_IMAGE_PIXELS": str(max(px, 40_000_000)),
               "SOWA_MAX_REQUEST_PIXELS": str(max(px, 160_000_000))}
        with ServerProcess(bundle, w / "data", w / "server.log", env=env) as srv:
            for name, data in uploads.items():
                srv.reset_peak_memory()
                base = srv.memory_kib()
                code = _post(srv.url, name, data)
                grow = (srv.memory_kib("VmHWM") - base) * 1024
                print(f"{name:14s} {len(data) / 1e3:9.0f} kB  {side}x{side}  HTTP {code}  peak +{grow / 2**20:7.0f} MiB"
                      f"  = {grow / px:5.1f} B/pixel")
            name = "grey16.png"
            srv.reset_peak_memory()
            base = srv.memory_kib()
            with ThreadPoolExecutor(a.concurrent) as pool:
                codes = list(pool.map(lambda _: _post(srv.url, name, uploads[name]), range(a.concurrent)))
            grow = (srv.memory_kib("VmHWM") - base) * 1024
            time.sleep(0.5)
            left = (srv.memory_kib() - base) * 1024
            print(f"{a.concurrent} x {name} at once: HTTP {codes}  peak +{grow / 2**20:.0f} MiB "
                  f"(decode budget {a.decode_memory_mb:g} MiB), held afterwards +{left / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
