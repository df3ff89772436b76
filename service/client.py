"""A small typed client of the service (httpx), used by the tests, the demo and the load benchmark.

    with SowaClient("http://127.0.0.1:8000") as c:
        c.register_shots("widget", ["good1.png", "good2.png"])
        result = c.predict(["part.png"], class_name="widget").results[0]
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import httpx
import numpy as np

from .http.schemas import ClassInfo, ClassList, Heatmap, PredictResponse, ReadyInfo

__all__ = ["ApiError", "AsyncSowaClient", "SowaClient", "decode_raw_heatmap"]

ImageInput = str | Path | bytes | tuple[str, bytes]


class ApiError(RuntimeError):
    """A non-2xx answer: `status`, `code` and `message` from the service's error body."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def _files(images: Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes, str]]]:
    out = []
    for i, img in enumerate(images):
        if isinstance(img, tuple):
            name, data = img
        elif isinstance(img, bytes):
            name, data = f"image-{i}", img
        else:
            name, data = Path(img).name, Path(img).read_bytes()
        out.append(("images", (name, data, "application/octet-stream")))
    return out


def _check(r: httpx.Response) -> httpx.Response:
    if r.is_success:
        return r
    try:
        err = r.json()["error"]
        code, message = err["code"], err["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", r.text[:200]
    retry = r.headers.get("Retry-After")
    raise ApiError(r.status_code, code, message, float(retry) if retry else None)


def decode_raw_heatmap(heatmap: Heatmap) -> np.ndarray:
    """A `raw` heatmap back to its (S, S) float32 array."""
    if heatmap.format != "raw" or heatmap.shape is None:
        raise ValueError("not a raw heatmap")
    return np.frombuffer(base64.b64decode(heatmap.data), dtype="<f4").reshape(heatmap.shape)


def _page(limit: int, after: str | None) -> dict[str, str | int]:
    return {"limit": limit} if after is None else {"limit": limit, "after": after}


def _predict_form(class_name: str | None, heatmap: str, threshold: float | None, keep: bool) -> dict[str, str]:
    """/predict's form fields: `threshold` overrides the class's for this request, `keep` keeps the results for the
    console (each then has a `result_id`)."""
    data = {"heatmap": heatmap, **({"class_name": class_name} if class_name else {})}
    if threshold is not None:
        data["threshold"] = repr(float(threshold))
    if keep:
        data["keep"] = "true"
    return data


class SowaClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> SowaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def predict(self, images: Sequence[ImageInput], class_name: str | None = None,
                heatmap: Literal["none", "png", "raw"] = "png", threshold: float | None = None,
                keep: bool = False) -> PredictResponse:
        data = _predict_form(class_name, heatmap, threshold, keep)
        return PredictResponse.model_validate(_check(self._http.post("/predict", files=_files(images),
                                                                     data=data)).json())

    def register_shots(self, name: str, images: Sequence[ImageInput],
                       mode: Literal["append", "replace"] = "append") -> ClassInfo:
        r = self._http.post(f"/classes/{name}/shots", files=_files(images), data={"mode": mode})
        return ClassInfo.model_validate(_check(r).json())

    def list_classes(self) -> list[ClassInfo]:
        """Every class, in name order, a page at a time."""
        out: list[ClassInfo] = []
        after: str | None = None
        while True:
            page = self.class_page(limit=1000, after=after)
            out += page.classes
            if page.next is None:
                return out
            after = page.next

    def class_page(self, limit: int = 100, after: str | None = None) -> ClassList:
        """One page of `GET /classes`: up to `limit` classes after the name `after`, the total and the next cursor."""
        return ClassList.model_validate(_check(self._http.get("/classes", params=_page(limit, after))).json())

    def get_class(self, name: str) -> ClassInfo:
        return ClassInfo.model_validate(_check(self._http.get(f"/classes/{name}")).json())

    def set_threshold(self, name: str, threshold: float | None) -> ClassInfo:
        r = self._http.patch(f"/classes/{name}", json={"threshold": threshold})
        return ClassInfo.model_validate(_check(r).json())

    def delete_class(self, name: str) -> None:
        _check(self._http.delete(f"/classes/{name}"))

    def ready(self) -> ReadyInfo:
        r = self._http.get("/readyz")
        if r.status_code not in (200, 503):
            _check(r)
        return ReadyInfo.model_validate(r.json())

    def metrics(self) -> str:
        return _check(self._http.get("/metrics")).text


class AsyncSowaClient:
    """`SowaClient`'s calls, awaited: for concurrent load (benchmarks, tests) and for an app served in-process
    (pass `http`, e.g. an `httpx.AsyncClient` on `httpx.ASGITransport(app)`; it is closed with this client)."""

    def __init__(self, base_url: str = "", api_key: str | None = None, timeout: float = 60.0,
                 max_connections: int = 64, http: httpx.AsyncClient | None = None) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        if http is None:
            limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits)
        else:
            http.headers.update(headers)
        self._http = http

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying client, for requests the typed calls do not cover."""
        return self._http

    async def __aenter__(self) -> AsyncSowaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def predict(self, images: Sequence[ImageInput], class_name: str | None = None,
                      heatmap: Literal["none", "png", "raw"] = "none", threshold: float | None = None,
                      keep: bool = False) -> PredictResponse:
        data = _predict_form(class_name, heatmap, threshold, keep)
        r = await self._http.post("/predict", files=_files(images), data=data)
        return PredictResponse.model_validate(_check(r).json())

    async def register_shots(self, name: str, images: Sequence[ImageInput],
                             mode: Literal["append", "replace"] = "append") -> ClassInfo:
        r = await self._http.post(f"/classes/{name}/shots", files=_files(images), data={"mode": mode})
        return ClassInfo.model_validate(_check(r).json())

    async def list_classes(self) -> list[ClassInfo]:
        """Every class, in name order, a page at a time."""
        out: list[ClassInfo] = []
        after: str | None = None
        while True:
            page = await self.class_page(limit=1000, after=after)
            out += page.classes
            if page.next is None:
                return out
            after = page.next

    async def class_page(self, limit: int = 100, after: str | None = None) -> ClassList:
        """One page of `GET /classes`: up to `limit` classes after the name `after`, the total and the next cursor."""
        r = await self._http.get("/classes", params=_page(limit, after))
        return ClassList.model_validate(_check(r).json())

    async def get_class(self, name: str) -> ClassInfo:
        return ClassInfo.model_validate(_check(await self._http.get(f"/classes/{name}")).json())

    async def set_threshold(self, name: str, threshold: float | None) -> ClassInfo:
        r = await self._http.patch(f"/classes/{name}", json={"threshold": threshold})
        return ClassInfo.model_validate(_check(r).json())

    async def delete_class(self, name: str) -> None:
        _check(await self._http.delete(f"/classes/{name}"))

    async def ready(self) -> ReadyInfo:
        r = await self._http.get("/readyz")
        if r.status_code not in (200, 503):
            _check(r)
        return ReadyInfo.model_validate(r.json())

    async def metrics(self) -> str:
        return _check(await self._http.get("/metrics")).text
