"""`sowa demo`: the whole story offline, on a CPU, in a minute or two.

1. make a bundle: the tiny embedded config with seeded random weights, untrained (few-shot only);
2. make a product: seeded synthetic parts, normal and with scratches, stains and missing pieces;
3. start the real server on a loopback port, register eight normal shots of the class;
4. score normal and defective parts over HTTP (kept for the console), write heatmap overlays, print a summary
   and the URL of the inspection console; with `serve`, keep serving until Ctrl-C.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.bundle import init_bundle
from training.synth import DEFECT_KINDS, make_part, with_defect
from training.visuals import colormap

from .server_process import ServerProcess

__all__ = ["ARCH", "console_url", "overlay", "run_demo"]

ARCH = "sowa-tiny"  # the embedded default (model/configs/): small enough for a CPU, shaped like ViT-L-14-336


def overlay(image: Image.Image, heatmap_png_b64: str, regions: list[dict]) -> Image.Image:
    """Image | heatmap blended over it, with the anomalous regions boxed."""
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(heatmap_png_b64))), dtype=np.float32) / 255
    blend = Image.blend(image.convert("RGB"), Image.fromarray(colormap(heat)), 0.5)
    draw = ImageDraw.Draw(blend)
    for r in regions:
        draw.rectangle(r["box"], outline=(0, 255, 120), width=2)
    out = Image.new("RGB", (image.width * 2, image.height))
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(blend, (image.width, 0))
    return out


def console_url(base: str) -> str:
    """Where the inspection console of a server at `base` shows the demo's class."""
    return f"{base}/ui/#/inspect/demo-part"


def run_demo(out: Path, seed: int = 0, shots: int = 8, jitter: float = 0.1, serve: bool = False) -> dict:
    """The whole story; `serve`: keep the server (and its console) running until Ctrl-C."""
    from service.client import SowaClient

    out.mkdir(parents=True, exist_ok=True)
    bundle = out / "bundle"
    print(f"[1/4] bundle: {ARCH}, random seeded weights, untrained -> {bundle}")
    init_bundle(ARCH, "none", bundle, seed=seed, force=True)

    rng = np.random.default_rng(seed)
    shot_images = [make_part(rng, jitter=jitter) for _ in range(shots)]  # a fixtured camera: small pose jitter
    tests = [("good", make_part(rng, jitter=jitter)) for _ in range(3)]
    tests += [(kind, with_defect(make_part(rng, jitter=jitter), rng, kind).image) for kind in DEFECT_KINDS
              for _ in range(2)]
    print(f"[2/4] product 'demo-part': {shots} normal shots, {len(tests)} parts to inspect")

    def png(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    print("[3/4] starting the server on a loopback port and registering the shots")
    with ServerProcess(bundle, out / "data", out / "server.log") as srv, SowaClient(srv.url) as client:
        info = client.register_shots("demo-part", [(f"shot-{i}.png", png(im)) for i, im in enumerate(shot_images)],
                                     mode="replace")
        files = [(f"{i:02d}-{kind}.png", png(img)) for i, (kind, img) in enumerate(tests)]
        response = client.predict(files, class_name="demo-part", heatmap="png", keep=True)  # kept for the console
        print(f"[4/4] scored {len(tests)} parts; overlays in {out / 'overlays'}")
        (out / "overlays").mkdir(exist_ok=True)
        rows, correct = [], 0
        for (kind, img), r in zip(tests, response.results, strict=True):
            overlay(img, r.heatmap.data, [g.model_dump() for g in r.regions]).save(out / "overlays" / r.filename)
            right = r.is_anomalous == (kind != "good")
            correct += right
            rows.append({"file": r.filename, "truth": kind, "score": round(r.score, 4), "verdict":
                         "ANOMALOUS" if r.is_anomalous else "normal", "regions": len(r.regions), "correct": right})
        print(f"\nclass demo-part: {info.shots} shots, threshold {info.threshold:.4f}\n")
        print(f"{'file':<16}{'truth':<10}{'score':>8}  {'verdict':<10}{'regions':>8}")
        for row in rows:
            print(f"{row['file']:<16}{row['truth']:<10}{row['score']:>8.4f}  {row['verdict']:<10}"
                  f"{row['regions']:>8}")
        print(f"\n{correct}/{len(rows)} parts judged right; the model is an untrained random-weight tiny CLIP, so "
              "this is the few-shot memory at work, not CLIP's knowledge.")
        summary = {"class": info.model_dump(), "results": rows, "correct": correct, "total": len(rows),
                   "console": console_url(srv.url)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\nconsole: {summary['console']}")
        if serve:
            print("serving until Ctrl-C", flush=True)
            try:
                while srv.proc is not None and srv.proc.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                print("\nstopping")
        else:
            print("(the server stops now; `sowa demo --serve` keeps it running)")
    return summary
