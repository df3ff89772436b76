from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from model.checkpoint_import import import_to_bundle
from model.sowa import SowaModel
from tests.helpers import PARITY, perturb_trainables, tiny_config

if TYPE_CHECKING:
    from tests.postgres_server import PostgresServer


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden case's research checkpoint imported as a bundle: a small real model the service, engine and
    deployment tests share (they only read it; a test that damages a bundle makes its own)."""
    out = tmp_path_factory.mktemp("parity") / "bundle"
    import_to_bundle(next(PARITY.glob("*.ckpt")), out, taps=None, text_heads=None, temperature=0.07)
    return out


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def tiny_model() -> SowaModel:
    """A 64 px, 4-block random CLIP with perturbed adapters/prompts, text vectors computed, eval mode."""
    torch.manual_seed(1)
    model = SowaModel(tiny_config())
    perturb_trainables(model)
    model.refresh_text()
    return model


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """`@pytest.mark.anyio` tests run on asyncio only: the service runs on it (uvicorn), never on trio."""
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test skipped for want of a GPU carries the `cuda` mark, so `pytest -m cuda` (the GPU check) runs
    all of them, whichever way a test file spells its skip."""
    for item in items:
        if any(str(m.kwargs.get("reason", "")).startswith("needs a CUDA device") for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (Debian's, on loopback); each test takes a database.
    Imported here, not at the top: the GPU check runs the CUDA tests where psycopg is not installed."""
    from tests.postgres_server import PostgresServer
    with PostgresServer() as server:
        yield server


@pytest.fixture()
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of the session's server for this test: its URL."""
    name = "t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    return postgres.create_database(name)
