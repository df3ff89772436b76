"""`sowa models` on a data directory, in-process: add, list with the serving state marked, activate, rollback,
shadow on and off, remove, and the one-line errors (exit 2) for what the repository refuses."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from model.bundle import read_manifest
from service.core.access.audit import AuditQuery
from service.core.access.store import open_access
from service.core.models.open import open_repository
from sowa.cli import main
from tests.service.test_model_versions import make_bundle


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("second") / "bundle", 96, 11)


def test_models_round_trip(bundle: Path, second: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOWA_STORE", raising=False)
    monkeypatch.delenv("SOWA_DATA_DIR", raising=False)
    data = tmp_path / "data"

    def sowa(*args: str) -> tuple[int, str, str]:
        code = main(["models", "--data-dir", str(data), *args])
        out, err = capsys.readouterr()
        return code, out, err

    def listed() -> dict[str, dict]:
        code, out, _ = sowa("list")
        assert code == 0
        return {v["version"]: v for v in map(json.loads, out.splitlines())}

    code, out, _ = sowa("add", str(bundle))
    v1 = json.loads(out)
    assert code == 0 and v1["fingerprint"] == read_manifest(bundle).fingerprint
    assert v1["added_by"] == f"cli:{getpass.getuser()}" and v1["version"] == v1["fingerprint"][:16]
    assert sowa("add", str(second), "--label", "v2")[0] == 0
    one = v1["version"]
    assert list(listed()) == [one, "v2"]  # oldest first

    # what the service does at start: the configured bundle is active; then the CLI asks for v2
    repo = open_repository(str(data), data)
    repo.set_state(active=v1["fingerprint"])
    code, out, _ = sowa("activate", "v2")
    assert code == 0 and "activating v2" in out
    state = repo.state()
    assert (state.active, state.target) == (v1["fingerprint"], listed()["v2"]["fingerprint"])
    marks = {k: {m: v[m] for m in ("active", "previous", "target", "shadow")} for k, v in listed().items()}
    assert marks == {one: {"active": True, "previous": False, "target": False, "shadow": False},
                     "v2": {"active": False, "previous": False, "target": True, "shadow": False}}

    # a service switched (as activation.py records it), then the CLI rolls back
    repo.set_state(active=state.target, previous=v1["fingerprint"], target=None)
    code, out, _ = sowa("rollback")
    assert code == 0 and repo.state().target == v1["fingerprint"]
    repo.set_state(active=v1["fingerprint"], previous=None, target=None)
    code, _, err = sowa("rollback")
    assert code == 2 and err.strip() == "sowa models: error: there is no previous model to roll back to"

    code, out, _ = sowa("shadow", "v2", "--share", "0.25")
    assert code == 0 and (repo.state().shadow, repo.state().shadow_share) == (listed()["v2"]["fingerprint"], 0.25)
    assert listed()["v2"]["shadow"] is True and listed()["v2"]["shadow_share"] == 0.25
    code, _, err = sowa("remove", "v2")
    assert code == 2 and "shadow" in err and len(err.strip().splitlines()) == 1
    assert sowa("shadow", "--off")[0] == 0 and repo.state().shadow is None
    code, _, err = sowa("shadow", v1["fingerprint"][:10])  # the one serving
    assert code == 2 and "serving" in err
    code, out, _ = sowa("remove", listed()["v2"]["fingerprint"][:12])
    assert code == 0 and out.strip() == "removed v2 and its banks of 0 classes" and list(listed()) == [one]

    for args, message in [(("activate", "nosuch"), "no model version 'nosuch'"),
                          (("add", str(tmp_path), "--label", "x"), "no sowa.json"),
                          (("add", str(second), "--label", "Bad"), "invalid model label"),
                          (("remove", one), "active model"),
                          (("shadow",), "give a VERSION")]:
        code, _, err = sowa(*args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    code, out, _ = sowa("activate", one)  # already active: nothing to do
    assert code == 0 and "is the active version" in out and repo.state().target is None
    repo.close()

    access = open_access(str(data))  # what changed what serves is in the audit trail, oldest first here
    events = [(e.actor, e.action, e.target, e.before, e.after) for e in reversed(access.query(AuditQuery()))]
    access.close()
    actor = f"cli:{getpass.getuser()}"
    assert events == [(actor, "model.activated", "v2", {"active": one}, {"active": "v2"}),
                      (actor, "model.activated", one, {"active": "v2"}, {"active": one}),
                      (actor, "model.shadow", "v2", {"shadow": None}, {"shadow": "v2", "share": 0.25}),
                      (actor, "model.shadow", "v2", {"shadow": "v2"}, None)]
