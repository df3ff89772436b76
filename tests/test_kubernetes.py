"""docker/kubernetes/: every manifest Kustomize applies, validated offline against the Kubernetes API schemas
(kubernetes-validate, strict: unknown fields fail), and what the service needs of them checked by name. KEDA's
ScaledObject is a CRD whose schema kubernetes-validate does not ship: it is validated against the openAPIV3Schema
of KEDA's published CRD (tests/data/crds/, copied from kedacore/keda), strictly too; so are KServe's ServingRuntime
and InferenceService (docker/kubernetes/kserve/), against KServe's CRDs (gzipped: the InferenceService's is 2 MB)."""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.core.settings import Settings
from service.core.telemetry import Telemetry
from sowa.commands.serve import add_arguments
from tests.helpers import REPO

K8S = REPO / "docker" / "kubernetes"
VERSION = "1.30.0"  # the oldest Kubernetes the manifests support (the preStop `sleep` action is 1.30's)
CRDS = REPO / "tests" / "data" / "crds"


def _docs(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".gz":
        return copy.deepcopy(_crd_docs(path))
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@functools.cache
def _crd_docs(path: Path) -> list[dict[str, Any]]:
    """A gzipped CRD, read once (KServe's InferenceService CRD is 2 MB of YAML; libyaml's loader where present)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(gzip.decompress(path.read_bytes()).decode(), Loader=loader) if d]


def _applied() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {d["kind"]: d for f in kustomization["resources"] for d in _docs(K8S / f)}


def _pod(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objs["Deployment"]["spec"]["template"]


@pytest.mark.parametrize("path", sorted(p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml")
                                        if p.name != "kustomization.yaml"))
def test_manifests_pass_the_kubernetes_schemas(path: str) -> None:
    for doc in _docs(K8S / path):
        if doc["apiVersion"].startswith(("keda.sh/", "serving.kserve.io/")):
            _validate_custom(doc)  # a CRD: kubernetes-validate has no schema for it
        else:
            kubernetes_validate.validate(doc, VERSION, strict=True)


def _crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    for path in sorted(CRDS.glob("*.yaml*")):
        for crd in _docs(path):
            if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
                (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
                return served["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {api_version} {kind} under {CRDS}")


def _unknown_fields(doc: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """What the API server's strict field validation refuses: keys that a structural schema does not declare."""
    if isinstance(doc, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        if schema.get("additionalProperties"):
            return []
        props = schema["properties"]
        return [f"{where}.{k}" for k in doc if k not in props and not (where == "" and k in ("apiVersion", "kind"))
                ] + [u for k, v in doc.items() if k in props for u in _unknown_fields(v, props[k], f"{where}.{k}")]
    if isinstance(doc, list) and "items" in schema:
        return [u for i, v in enumerate(doc) for u in _unknown_fields(v, schema["items"], f"{where}[{i}]")]
    return []


def _validate_custom(doc: dict[str, Any]) -> None:
    schema = _crd_schema(doc["apiVersion"], doc["kind"])
    jsonschema.Draft7Validator(schema).validate(doc)  # types, required fields, enums
    unknown = _unknown_fields({k: v for k, v in doc.items() if k != "metadata"}, schema)
    if unknown:
        raise jsonschema.ValidationError(f"unknown fields {unknown}")


def test_the_validator_bites() -> None:
    deployment = copy.deepcopy(_applied()["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


def test_the_crd_validator_bites() -> None:
    scaled = _applied()["ScaledObject"]
    _validate_custom(scaled)
    typo = copy.deepcopy(scaled)
    typo["spec"]["triggers"][0]["metricTyp"] = "AverageValue"
    with pytest.raises(jsonschema.ValidationError, match=r"unknown fields \['.spec.triggers\[0\].metricTyp'\]"):
        _validate_custom(typo)
    wrong = copy.deepcopy(scaled)
    wrong["spec"]["minReplicaCount"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        _validate_custom(wrong)
    wrong = copy.deepcopy(scaled)
    del wrong["spec"]["scaleTargetRef"]
    with pytest.raises(jsonschema.ValidationError, match="'scaleTargetRef' is a required property"):
        _validate_custom(wrong)


def test_the_kserve_runtime_serves_the_protocol_and_the_validator_bites() -> None:
    runtime, = _docs(K8S / "kserve" / "servingruntime.yaml")
    isvc, = _docs(K8S / "kserve" / "inferenceservice.yaml")
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    (container,) = runtime["spec"]["containers"]
    args = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    assert args == {"--bundle": "/mnt/models", "--host": "0.0.0.0", "--port": "8080", "--grpc-port": "9000"}
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # `sowa serve`'s flags: the runtime's arguments exist and parse
    parsed = parser.parse_args(container["args"])
    assert (parsed.port, parsed.grpc_port) == (8080, 9000)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] == "sowa"
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["model"]["storageUrl"] = "pvc://x"
    with pytest.raises(jsonschema.ValidationError, match="storageUrl"):
        _validate_custom(typo)
    wrong = copy.deepcopy(runtime)
    wrong["spec"]["supportedModelFormats"][0]["autoSelect"] = "yes"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'boolean'"):
        _validate_custom(wrong)


def test_the_deployment_has_what_the_service_needs() -> None:
    objs = _applied()
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
            "ScaledObject"} <= set(objs)
    pod = _pod(objs)
    spec, (container,) = pod["spec"], pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "preStop" in container["lifecycle"] and spec["terminationGracePeriodSeconds"] >= 30
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001  # the image's
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    bundles = next(m for m in container["volumeMounts"] if m["mountPath"] == "/bundles")
    assert bundles["readOnly"]
    sources = {next(iter(e.values()))["name"] for e in container["envFrom"]}
    assert sources == {objs["ConfigMap"]["metadata"]["name"], "sowa-secrets"}
    secret = _docs(K8S / "secret.example.yaml")[0]
    assert secret["metadata"]["name"] == "sowa-secrets" and set(secret["stringData"]) == {"SOWA_API_KEY",
                                                                                          "SOWA_STORE"}
    assert secret["stringData"]["SOWA_STORE"].startswith("postgresql://")
    known = {f"SOWA_{name.upper()}" for name in Settings.model_fields}
    assert set(objs["ConfigMap"]["data"]) <= known, set(objs["ConfigMap"]["data"]) - known
    values = {k.removeprefix("SOWA_").lower(): v for k, v in {**objs["ConfigMap"]["data"],
                                                               **secret["stringData"]}.items()}
    assert Settings(**values).store_url.startswith("postgresql://")  # the settings are valid as a whole
    labels = pod["metadata"]["labels"]
    for selector in (objs["Service"]["spec"]["selector"], objs["PodDisruptionBudget"]["spec"]["selector"]
                     ["matchLabels"], objs["Deployment"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert objs["Service"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_scaling_queries_use_the_service_metrics() -> None:
    objs = _applied()
    scaled = objs["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == objs["Deployment"]["metadata"]["name"]
    queries = {t["name"]: t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"}
    assert "sowa_queue_depth" in queries["queue-depth"]
    assert "sowa_queue_wait_seconds_bucket" in queries["queue-wait-p90"]
    exported = Telemetry().render().decode()
    assert "sowa_queue_depth " in exported and "sowa_queue_wait_seconds_bucket{" in exported
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    hpa = _docs(K8S / "alternatives" / "hpa-prometheus-adapter.yaml")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == objs["Deployment"]["metadata"]["name"]


def test_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the resources are read one by one by the tests above")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in built} == set(_applied())
    assert all(d["metadata"].get("namespace") == "sowa" for d in built if d["kind"] != "Namespace")
