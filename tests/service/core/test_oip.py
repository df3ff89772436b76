"""The Open Inference Protocol's mapping (service/core/oip.py), without a server: tensors to uploads, parameters
to score options, results to outputs in Triton's binary form."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.core import oip
from service.core.errors import ClassNotFoundError, PayloadTooLargeError, UnprocessableError
from service.core.uploads import decode_upload


def _bytes(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def _request(name: str, datatype: str, shape: tuple, data: object, **kw: object) -> oip.InferRequest:
    return oip.InferRequest("zero-shot", [oip.InputTensor(name, datatype, shape, data)], **kw)  # type: ignore[arg-type]


def test_pixels_reach_the_decoder_unchanged() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    uploads = oip.to_uploads(_request("pixels", "UINT8", pixels.shape, pixels.tobytes()), 4)
    assert [name for name, _ in uploads] == ["pixels[0]", "pixels[1]"]
    for (name, data), expected in zip(uploads, pixels, strict=True):
        assert np.array_equal(np.asarray(decode_upload(data, name, 10_000)), expected)
    # the same as JSON numbers, nested as the shape
    listed = oip.to_uploads(_request("pixels", "UINT8", pixels.shape, pixels.reshape(-1).tolist()), 4)
    assert listed == uploads


def test_bytes_elements_are_read_exactly() -> None:
    png = io.BytesIO()
    Image.new("RGB", (3, 2), (10, 20, 30)).save(png, format="PNG")
    uploads = oip.to_uploads(_request("images", "BYTES", (2,), _bytes(png.getvalue(), b"x")), 4)
    assert uploads == [("images[0]", png.getvalue()), ("images[1]", b"x")]
    assert oip.bytes_elements(_bytes(b"", b"ab"), 2, "t") == [b"", b"ab"]
    for data, count, word in ((_bytes(b"ab") + b"\x01", 1, "cut short"), (b"\xff\xff\xff\x7fab", 1, "runs past"),
                              (_bytes(b"a", b"b"), 1, "elements"), (_bytes(b"a"), 2, "elements")):
        with pytest.raises(UnprocessableError, match=word):
            oip.bytes_elements(data, count, "t")


@pytest.mark.parametrize(("name", "datatype", "shape", "data", "word"), [
    ("images", "UINT8", (1,), b"x", "datatype"),
    ("pixels", "UINT8", (1, 2, 2), b"\0" * 12, "shape"),
    ("pixels", "UINT8", (1, 2, 2, 1), b"\0" * 4, "shape"),
    ("pixels", "UINT8", (1, 0, 2, 3), b"", "shape"),
    ("pixels", "UINT8", (1, 2**40, 2**40, 3), b"\0" * 12, "bytes in its shape"),
    ("pixels", "UINT8", (1, 1, 1, 3), [1, 2, 256], "0..255"),
    ("pixels", "UINT8", (1, 1, 1, 3), [1, 2, "x"], "integers"),
    ("images", "BYTES", (0,), b"", "no images"),
    ("images", "BYTES", (5,), _bytes(*[b"a"] * 5), "more than the limit"),
    ("tensor", "BYTES", (1,), _bytes(b"a"), "unknown input"),
])
def test_bad_tensors_are_refused_before_any_copy(name: str, datatype: str, shape: tuple, data: object,
                                                 word: str) -> None:
    with pytest.raises(UnprocessableError, match=word):
        oip.to_uploads(_request(name, datatype, shape, data), 4)


def test_values_listed_one_by_one_are_bounded() -> None:
    """JSON numbers and gRPC's typed contents become Python objects: a frame's pixels that way are refused (413),
    where the same bytes as a binary tensor pass."""
    n = oip.MAX_LISTED_VALUES // 3 + 1
    with pytest.raises(PayloadTooLargeError, match="binary tensor"):
        oip.to_uploads(_request("pixels", "UINT8", (1, 1, n, 3), [0] * (3 * n)), 4)
    assert len(oip.to_uploads(_request("pixels", "UINT8", (1, 1, n, 3), bytes(3 * n)), 4)) == 1


def test_parameters_and_outputs() -> None:
    ok = oip.score_options(_request("images", "BYTES", (1,), b"", parameters={
        "threshold": 0.25, "binary_data_output": True, "record": False, "part_id": "P-1", "tags": "a,b"}))
    assert (ok.class_name, ok.threshold, ok.need_maps, ok.record) == (None, 0.25, False, False)
    assert (ok.meta.part_id, ok.meta.tags) == ("P-1", ("a", "b"))
    assert oip.score_options(_request("images", "BYTES", (1,), b"", outputs=["anomaly_map"])).need_maps
    for parameters, word in (({"threshold": 1.5}, "threshold"), ({"threshold": True}, "threshold"),
                             ({"threshold": float("nan")}, "threshold"), ({"record": "yes"}, "record"),
                             ({"station": 3}, "station"), ({"tags": "<b>"}, "tag"), ({"treshold": 0.3}, "unknown")):
        with pytest.raises(UnprocessableError, match=word):
            oip.score_options(_request("images", "BYTES", (1,), b"", parameters=parameters))
    for outputs, word in ((["heatmap"], "unknown output"), (["score", "score"], "twice")):
        with pytest.raises(UnprocessableError, match=word):
            oip.score_options(_request("images", "BYTES", (1,), b"", outputs=outputs))
    assert oip.class_of("zero-shot") is None and oip.class_of("widget") == "widget"
    with pytest.raises(ClassNotFoundError):
        oip.class_of("../etc")


def test_outputs_in_tritons_binary_form() -> None:
    scores = oip.OutputTensor("score", "FP64", (2,), np.array([0.25, 0.5]))
    assert np.frombuffer(scores.raw(), "<f8").tolist() == [0.25, 0.5]
    verdicts = oip.OutputTensor("is_anomalous", "BOOL", (2,), np.array([True, False]))
    assert verdicts.raw() == b"\x01\x00"
    ids = oip.OutputTensor("record_id", "BYTES", (2,), np.array([b"r1", b""], dtype=object))
    assert ids.raw() == _bytes(b"r1", b"")
    meta = oip.model_metadata("widget", 64)
    assert [o["name"] for o in meta["outputs"]] == list(oip.OUTPUTS)
    assert meta["outputs"][-1]["shape"] == [-1, 64, 64]
