"""The Open Inference Protocol v2 (KServe v2, Triton's clients) mapped onto `Backend.score`, for either transport.

The mapping (docs/service.md, "Open Inference Protocol"):
- every registered class is a model of that name; the model `zero-shot` scores without a class;
- one input, exactly: `images`, BYTES `[N]`, each element an encoded image (any format the service decodes), or
  `pixels`, UINT8 `[N, H, W, 3]`, RGB. Pixels travel to the decoder as a binary PPM (a short header on the
  same bytes), so both take the one path of /predict: the same limits, decode budget, staging and numbers;
- request parameters: `threshold` (this request's threshold on `score`, in (0, 1), never stored), and for the
  inspection records of a class's images `record` (bool: record them or not, default as the service is set),
  `part_id`, `station` and `tags` (comma-separated), checked as /predict's; Triton's reserved ones
  (`binary_data_output`, `priority`, `timeout`, sequence ids) are accepted and ignored, anything else is refused,
  so a misspelt option never passes unseen;
- outputs, each `[N]`: `score`, `normalized_score`, `threshold`, `text_score` (FP64: /predict's numbers exactly),
  `is_anomalous` (BOOL), `record_id` (BYTES, where the service keeps inspection records), and `anomaly_map`
  (FP32 `[N, S, S]`, reference scale) only when a request names it among its outputs: without it no map leaves
  the device that cannot hold a region.

The transports (service/http/routes/v2.py, service/rpc/) parse their wire format into `InferRequest` and encode
`OutputTensor`s; errors are the service's own (service/core/errors.py), which each turns into its protocol's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Backend, Scored, ScoreOptions
from .class_names import CLASS_NAME
from .errors import ClassNotFoundError, PayloadTooLargeError, UnprocessableError
from .records.record import RecordMeta
from .uploads import Upload, check_count

__all__ = [
    "EXTENSIONS",
    "INPUTS",
    "MAX_LISTED_VALUES",
    "OUTPUTS",
    "PLATFORM",
    "SERVER_NAME",
    "ZERO_SHOT",
    "InferRequest",
    "InputTensor",
    "OutputTensor",
    "bytes_elements",
    "class_of",
    "infer",
    "model_metadata",
    "score_options",
    "server_version",
    "to_uploads",
]

SERVER_NAME = "sowa"
ZERO_SHOT = "zero-shot"
PLATFORM = "sowa"
EXTENSIONS = ("binary_tensor_data", "model_repository")  # Triton's names for the HTTP extensions served
INPUTS = ({"name": "images", "datatype": "BYTES", "shape": [-1]},
          {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]})
# name -> datatype; anomaly_map is [N, S, S], the others [N]
OUTPUTS = {"score": "FP64", "normalized_score": "FP64", "threshold": "FP64", "text_score": "FP64",
           "is_anomalous": "BOOL", "record_id": "BYTES", "anomaly_map": "FP32"}
_DEFAULT_OUTPUTS = ("score", "normalized_score", "threshold", "text_score", "is_anomalous", "record_id")
# request parameters Triton's clients set on their own; accepted, not acted on
_IGNORED_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start",
                                 "sequence_end", "headers"})
# values a tensor may carry one by one (JSON numbers, gRPC's typed contents) rather than as raw bytes: each costs a
# Python object on the way in, so this bounds that memory (an image's pixels belong in binary tensors)
MAX_LISTED_VALUES = 1 << 20
_DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
                "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}


@dataclass(frozen=True)
class InputTensor:
    """One input as a transport read it: `data` is the tensor's raw bytes (little-endian; BYTES elements each
    after a 4-byte little-endian length, as in Triton's binary form), or a list of the elements where the
    transport carries them one by one (JSON numbers, gRPC's typed contents)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | list[Any]


@dataclass(frozen=True)
class InferRequest:
    model: str
    inputs: Sequence[InputTensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: Sequence[str] | None = None  # the outputs asked for; None: the default ones
    id: str = ""


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray  # for BYTES: an object array of bytes

    def raw(self) -> bytes:
        """Triton's binary form: little-endian values, BYTES elements each after its 4-byte length."""
        if self.datatype == "BYTES":
            return b"".join(len(b).to_bytes(4, "little") + b for b in self.array.reshape(-1))
        return np.ascontiguousarray(self.array, dtype=self.array.dtype.newbyteorder("<")).tobytes()


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sowa-inspect")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "0"


def class_of(model: str) -> str | None:
    """The class a model name addresses (None: zero-shot); 404 later for one that is not registered."""
    if model == ZERO_SHOT:
        return None
    if not CLASS_NAME.fullmatch(model):
        raise ClassNotFoundError(f"no model '{model[:64]}': models are the registered classes and '{ZERO_SHOT}'")
    return model


def model_metadata(model: str, image_size: int) -> dict[str, Any]:
    """The protocol's model metadata (the same over both transports)."""
    outputs = [{"name": n, "datatype": t, "shape": [-1, image_size, image_size] if n == "anomaly_map" else [-1]}
               for n, t in OUTPUTS.items()]
    return {"name": model, "versions": ["1"], "platform": PLATFORM, "inputs": [dict(i) for i in INPUTS],
            "outputs": outputs}


_TEXT_PARAMETERS = ("part_id", "station", "tags")


def score_options(request: InferRequest) -> ScoreOptions:
    threshold, record, text = None, None, {}
    for key, value in request.parameters.items():
        if key == "threshold":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0 \
                    or not math.isfinite(value):
                raise UnprocessableError("parameter threshold: a number in (0, 1)")
            threshold = float(value)
        elif key == "record":
            if not isinstance(value, bool):
                raise UnprocessableError("parameter record: true or false")
            record = value
        elif key in _TEXT_PARAMETERS:
            if not isinstance(value, str):
                raise UnprocessableError(f"parameter {key}: a string")
            text[key] = value
        elif key not in _IGNORED_PARAMETERS:
            raise UnprocessableError(f"unknown parameter '{str(key)[:64]}': this server takes threshold, record, "
                                     "part_id, station and tags")
    meta = RecordMeta.of(text.get("part_id"), text.get("station"), [text["tags"]] if "tags" in text else None)
    wanted = _wanted(request.outputs)
    return ScoreOptions(class_of(request.model), threshold, need_maps="anomaly_map" in wanted, record=record,
                        meta=meta)


def _wanted(outputs: Sequence[str] | None) -> tuple[str, ...]:
    if outputs is None:
        return _DEFAULT_OUTPUTS
    for name in outputs:
        if name not in OUTPUTS:
            raise UnprocessableError(f"unknown output '{str(name)[:64]}'; the outputs are {', '.join(OUTPUTS)}")
    if len(set(outputs)) != len(outputs):
        raise UnprocessableError("an output is asked for twice")
    return tuple(outputs)


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bytes_elements(data: bytes | memoryview, count: int, what: str) -> list[bytes]:
    """The elements of a BYTES tensor in Triton's binary form: each a 4-byte little-endian length, then that
    many bytes; exactly `count` of them, filling `data`."""
    view, out, at = memoryview(data), [], 0
    while at < len(view):
        if at + 4 > len(view):
            raise UnprocessableError(f"{what}: a BYTES element's length is cut short")
        length = int.from_bytes(view[at:at + 4], "little")
        at += 4
        if at + length > len(view):
            raise UnprocessableError(f"{what}: a BYTES element runs past the tensor's data")
        out.append(bytes(view[at:at + length]))
        at += length
        if len(out) > count:
            break
    if len(out) != count:
        raise UnprocessableError(f"{what}: {count} elements in its shape, not as many in its data")
    return out


def to_uploads(request: InferRequest, max_images: int) -> list[Upload]:
    """The request's images as `(name, encoded bytes)` uploads, every shape and size checked first; more than
    `max_images` is refused before any is copied."""
    if len(request.inputs) != 1:
        raise UnprocessableError(f"{len(request.inputs)} inputs: give exactly one, 'images' (BYTES [N], encoded) "
                                 "or 'pixels' (UINT8 [N,H,W,3])")
    t = request.inputs[0]
    if isinstance(t.data, list) and len(t.data) > MAX_LISTED_VALUES:
        raise PayloadTooLargeError(f"input {t.name[:64]}: more than {MAX_LISTED_VALUES} values one by one; send it "
                                   "as a binary tensor")
    expected = {i["name"]: i for i in INPUTS}.get(t.name)
    if expected is None:
        raise UnprocessableError(f"unknown input '{t.name[:64]}': 'images' (BYTES [N]) or 'pixels' (UINT8 [N,H,W,3])")
    if t.datatype != expected["datatype"]:
        raise UnprocessableError(f"input {t.name}: datatype {t.datatype[:16]}, expected {expected['datatype']}")
    if len(t.shape) != len(expected["shape"]) or any(d < 0 for d in t.shape) \
            or (t.name == "pixels" and (t.shape[3] != 3 or 0 in t.shape[1:3])):
        raise UnprocessableError(f"input {t.name}: shape {list(t.shape)[:8]}, expected {expected['shape']} "
                                 "(-1: any size)")
    count = t.shape[0]
    if count == 0:
        raise UnprocessableError(f"input {t.name}: no images")
    check_count(count, max_images)
    if t.name == "images":
        elements = (bytes_elements(t.data, count, "input images") if not isinstance(t.data, list)
                    else _listed_bytes(t.data, count))
        return [(f"images[{i}]", e) for i, e in enumerate(elements)]
    return _pixel_uploads(t, count)


def _listed_bytes(data: list[Any], count: int) -> list[bytes]:
    if len(data) != count or not all(isinstance(e, (bytes, str)) for e in data):
        raise UnprocessableError(f"input images: {count} elements in its shape, not as many byte strings in its data")
    return [e.encode() if isinstance(e, str) else e for e in data]


def _pixel_uploads(t: InputTensor, count: int) -> list[Upload]:
    _, h, w, _ = t.shape
    size = h * w * 3
    if isinstance(t.data, list):
        if len(t.data) != count * size:
            raise UnprocessableError(f"input pixels: {count * size} values in its shape, {len(t.data)} in its data")
        try:
            array = np.asarray(t.data, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise UnprocessableError("input pixels: values must be integers in 0..255") from None
        if array.size and (array.min() < 0 or array.max() > 255):
            raise UnprocessableError("input pixels: values must be integers in 0..255")
        data = memoryview(array.astype(np.uint8).tobytes())
    else:
        data = memoryview(t.data)
        if len(data) != count * size:
            raise UnprocessableError(f"input pixels: {count * size} bytes in its shape, {len(data)} in its data")
    header = b"P6\n%d %d\n255\n" % (w, h)  # a binary PPM: PIL reads it as these RGB pixels, nothing changed
    return [(f"pixels[{i}]", header + data[i * size:(i + 1) * size]) for i in range(count)]


async def infer(backend: Backend, request: InferRequest, timeout_s: float, limits: Any, budget: Any,
                max_images: int, max_image_bytes: int = 0) -> tuple[Scored, list[OutputTensor]]:
    """Score the request's images through `Backend.score` (the class checked before the tensors are read) and
    give the outputs asked for; `max_image_bytes`: a recorded upload larger than this is recorded without it."""
    options = score_options(request)

    async def read() -> list[Upload]:
        return to_uploads(request, max_images)

    scored = await backend.score(read, options, timeout_s, limits, budget, max_image_bytes)
    return scored, outputs(scored, request.outputs)


def outputs(scored: Scored, asked: Sequence[str] | None) -> list[OutputTensor]:
    results = [image.result for image in scored.images]
    n = len(results)
    records = [image.record_id for image in scored.images]  # None: not recorded (zero-shot, record=false)
    out = []
    for name in _wanted(asked):
        if name == "record_id":
            if asked is None and all(r is None for r in records):
                continue  # no records here: not among the default outputs
            array = np.array([(r or "").encode() for r in records], dtype=object)
        elif name == "anomaly_map":
            array = np.stack([np.asarray(r.anomaly_map, dtype=np.float32) for r in results])
        elif name == "is_anomalous":
            array = np.array([bool(r.is_anomalous) for r in results], dtype=np.bool_)
        else:
            array = np.array([float(getattr(r, name)) for r in results], dtype=np.float64)
        out.append(OutputTensor(name, OUTPUTS[name], (n, *array.shape[1:]), array))
    return out


def element_size(datatype: str) -> int | None:
    """Bytes per element of a fixed-size datatype; None for BYTES or an unknown name."""
    return _DTYPE_BYTES.get(datatype)


def tensor_bytes(datatype: str, shape: Sequence[int]) -> int | None:
    size = element_size(datatype)
    return None if size is None else size * _count(shape)
