"""The service's use of model/postprocess.py: a per-request threshold on an `ImageResult`, the kept thumbnails'
colours, and `ImageResult` as `ScoreColumns` by name."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.inference import ScoreColumns
from service.core.engine import ImageResult
from service.core.results import THUMB_SIZE, heat_thumbnail, override_threshold


def _old_override(score: float, threshold: float) -> tuple[float, bool]:  # results.py's formula, as it was
    v = 0.5 * score / threshold if score <= threshold else 0.5 + 0.5 * (score - threshold) / (1.0 - threshold)
    return min(max(v, 0.0), 1.0), score > threshold


def test_override_threshold_gives_the_numbers_it_gave() -> None:
    rng = np.random.default_rng(3)
    for score, thr in zip(rng.random(300).tolist(), rng.uniform(0.01, 0.99, 300).tolist(), strict=True):
        r = ImageResult(None, 0.3, score, 0.7, 0.43, False, 2.0, 1.0)
        o = override_threshold(r, thr)
        assert (o.normalized_score, o.is_anomalous) == _old_override(score, thr)
        assert (o.score, o.threshold, o.text_score, o.map_max) == (score, thr, 0.3, 1.0)
    o = override_threshold(ImageResult(None, 0.3, 0.6, 0.7, 0.43, False, 2.0), 0.5)
    assert o.is_anomalous is True and o.normalized_score == pytest.approx(0.6)
    assert override_threshold(o, None) is o


def _old_thumbnail(img: Image.Image, anomaly_map: np.ndarray, vmax: float) -> bytes:  # as it was
    heat_stops = np.array([[0, 0, 0], [120, 0, 140], [230, 60, 30], [255, 210, 0], [255, 255, 255]], np.float32)
    img = img.copy()
    img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
    heat = np.clip(anomaly_map / max(vmax, 1e-12), 0.0, 1.0)
    pos = heat * (len(heat_stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(heat_stops) - 2)
    t = (pos - lo)[..., None]
    rgb = Image.fromarray((heat_stops[lo] * (1 - t) + heat_stops[lo + 1] * t).astype(np.uint8)).resize(
        img.size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    Image.blend(img.convert("RGB"), rgb, 0.45).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def test_thumbnails_keep_their_colours() -> None:
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    anomaly_map = (rng.random((32, 32)) * 5).astype(np.float32)
    assert heat_thumbnail(img, anomaly_map, 3.0) == _old_thumbnail(img, anomaly_map, 3.0)


def test_image_results_are_score_columns_by_name() -> None:
    cols = ScoreColumns(text_score=0.1, score=0.7, threshold=0.6, normalized_score=0.8, is_anomalous=True,
                        map_max=15.0)
    r = ImageResult.from_columns(cols, None, 2.0)
    assert r == ImageResult(None, 0.1, 0.7, 0.6, 0.8, True, 2.0, 15.0)
    assert r.columns() == cols
