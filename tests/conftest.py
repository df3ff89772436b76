from __future__ import annotations

import hashlib
import os
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


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """pyproject's addopts run the suite with pytest-xdist (`-n`, `--dist`, ...). Where xdist is off
    (`-p no:xdist`) or not installed, those options are accepted and mean nothing: the suite runs in one process."""
    if pluginmanager.has_plugin("xdist"):
        return
    group = parser.getgroup("xdist (inactive)")
    # a lowercase short option is pytest's to give: xdist takes `-n` the same way
    group._addoption("-n", "--numprocesses", dest="numprocesses", default=None, help="ignored: xdist is off")
    group.addoption("--maxprocesses", dest="maxprocesses", default=None, help="ignored: xdist is off")
    group.addoption("--dist", dest="dist", default="no", help="ignored: xdist is off")
    group.addoption("--no-loadscope-reorder", dest="loadscopereorder", action="store_false", default=True,
                    help="ignored: xdist is off")


def pytest_configure(config: pytest.Config) -> None:
    """A pytest that a test starts (the GPU check's CUDA step) runs in one process: the test already has its core,
    and workers of its own would only add their start-up. (The outer run has read `-n auto` by now.)"""
    os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"] = "0"
    if hasattr(config, "workerinput"):
        # an xdist worker: its share of the cores for torch's own threads. Left at torch's default (every core,
        # in each worker) a training step took ~6x longer than in one process (1.4 s -> 8.7 s, measured)
        workers = int(config.workerinput["workercount"])
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


# handed out first, before the modules with the most slow tests: a test this long, started late, ends the run on one
# worker while the other idles
LONGEST = ("tests/test_gpu_check.py",)  # the GPU check's CPU plan: about 3 minutes on a 2-core CPU


# tryfirst: xdist's worker hook turns an `xdist_group` mark into the nodeid's `@group` suffix that loadgroup
# schedules by; a mark added after it is ignored (measured: each test of test_topologies, test_oip and
# test_worker_attacks started its module's server again, on whichever worker it landed)
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test skipped for want of a GPU carries the `cuda` mark, so `pytest -m cuda` (the GPU check) runs
    all of them, whichever way a test file spells its skip.

    Under xdist (`--dist loadgroup`, pyproject's addopts) the tests of a module that share a module- or
    class-scoped fixture (a server, a workspace) go to one worker together, in their order, so the fixture is made
    once; other tests go one by one to whichever worker is free. Modules with more `slow` tests are handed out
    first, so that the long ones do not end the run on one worker while the other idles."""
    for item in items:
        if any(str(m.kwargs.get("reason", "")).startswith("needs a CUDA device") for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
    if not hasattr(config, "workerinput"):  # not an xdist worker: collection order, as written
        return
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d.scope in ("module", "class", "package") for ds in defs.values() for d in ds):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
    slow: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        slow[module] = slow.get(module, 0) + (item.get_closest_marker("slow") is not None)
    def rank(item: pytest.Item) -> tuple[bool, int]:
        module = item.nodeid.split("::", 1)[0]
        return module not in LONGEST, -slow[module]

    items.sort(key=rank)  # stable: a module's own order is kept


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
