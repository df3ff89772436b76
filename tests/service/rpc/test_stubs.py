"""The committed gRPC stubs are what grpc_tools.protoc makes of the committed protos, and the KServe proto is the
published one, licence header included (service/rpc/proto/__init__.py says how to regenerate)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO

protoc = pytest.importorskip("grpc_tools.protoc")

PROTO = REPO / "service" / "rpc" / "proto"
# kserve/open-inference-protocol, specification/protocol/open_inference_grpc.proto at d49cc23
KSERVE_SHA256 = "0f715460d60b014a23e06ac8e768cfa3d8336221cdb66bd7aeeab6dc27620b0f"


def test_the_kserve_proto_is_the_published_one_with_its_licence() -> None:
    text = (PROTO / "open_inference_grpc.proto").read_text()
    assert text.startswith("// Copyright 2023 The KServe Authors.")
    assert "Licensed under the Apache License, Version 2.0" in text
    assert hashlib.sha256(text.encode()).hexdigest() == KSERVE_SHA256


def test_regenerating_the_stubs_gives_the_committed_code(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "service" / "rpc" / "proto").mkdir(parents=True)
    src = tmp_path / "src" / "service" / "rpc" / "proto"
    src.mkdir(parents=True)
    for proto in ("open_inference_grpc.proto", "stream.proto"):
        shutil.copy(PROTO / proto, src / proto)
    include = str(tmp_path / "src")
    assert protoc.main(["protoc", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                        "service/rpc/proto/open_inference_grpc.proto"]) == 0
    assert protoc.main(["protoc", f"-I{include}", f"--python_out={out}", "service/rpc/proto/stream.proto"]) == 0
    made = sorted(p.name for p in (out / "service" / "rpc" / "proto").iterdir())
    assert made == ["open_inference_grpc_pb2.py", "open_inference_grpc_pb2_grpc.py", "stream_pb2.py"]
    for name in made:
        assert (out / "service" / "rpc" / "proto" / name).read_text() == (PROTO / name).read_text(), name
