from __future__ import annotations

import pytest
import torch

from model.sowa import SowaModel
from tests.helpers import perturb_trainables, tiny_config


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
