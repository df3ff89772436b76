"""Generated code: KServe's Open Inference Protocol proto (open_inference_grpc.proto, Apache-2.0, copied unchanged
from github.com/kserve/open-inference-protocol, specification/protocol/, commit d49cc23) and Triton's streaming
answer (stream.proto). Regenerate from the repository root with

    python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. service/rpc/proto/open_inference_grpc.proto
    python3 -m grpc_tools.protoc -I . --python_out=. service/rpc/proto/stream.proto

tests/service/rpc/test_stubs.py checks that this gives the committed files. The messages register under the
protocol's package `inference` in protobuf's default pool, as tritonclient's do: import one or the other in a
process, not both.
"""
