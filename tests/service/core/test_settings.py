from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.settings import Settings


def test_environment_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOWA_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("SOWA_API_KEY", "")  # what compose passes when no key is configured
    monkeypatch.setenv("SOWA_BANK_DEVICE_BUDGET_MB", "")  # ditto: the default budget
    s = Settings(bundle=Path("b"), max_wait_ms=2)
    assert s.max_batch_size == 8 and s.max_wait_ms == 2 and s.api_key is None and s.bank_device_budget_mb is None
    monkeypatch.setenv("SOWA_BANK_DEVICE_BUDGET_MB", "2048.5")
    assert Settings(bundle=Path("b")).bank_device_budget_mb == 2048.5
    monkeypatch.setenv("SOWA_API_KEY", "long-enough-key")
    assert Settings(bundle=Path("b")).api_key.get_secret_value() == "long-enough-key"


@pytest.mark.parametrize(("given", "mode"), [("", None), ("off", None), ("OFF", None), ("default", "default"),
                                             ("reduce-overhead", "reduce-overhead")])
def test_compile_mode(monkeypatch: pytest.MonkeyPatch, given: str, mode: str | None) -> None:
    monkeypatch.setenv("SOWA_COMPILE_MODE", given)
    monkeypatch.setenv("SOWA_IMAGE_DECODER", "torchvision")
    s = Settings(bundle=Path("b"))
    assert s.compile_mode == mode and s.image_decoder == "torchvision"


@pytest.mark.parametrize("bad", [{"api_key": "short"}, {"dtype": "fp8"}, {"max_batch_size": 0},
                                 {"max_batch_size": 64, "max_queue": 32}, {"port": 70000}, {"unknown": 1},
                                 {"bank_device_budget_mb": -1}, {"compile_mode": "fast"},
                                 {"image_decoder": "nvjpeg"}])
def test_invalid_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(bundle=Path("b"), **bad)


def test_compile_without_warmup_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOWA_WARMUP", "false")
    with pytest.raises(ValidationError, match="needs the warm-up.*SOWA_WARMUP=true.*SOWA_COMPILE_MODE=off"):
        Settings(bundle=Path("b"), compile_mode="default")
    assert Settings(bundle=Path("b"), compile_mode="off").warmup is False  # eager without warm-up is fine
    monkeypatch.setenv("SOWA_WARMUP", "true")
    assert Settings(bundle=Path("b"), compile_mode="default").compile_mode == "default"
