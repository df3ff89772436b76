"""`sowa serve`: settings from flags and SOWA_* variables, then uvicorn on the service app."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = ["serve", "settings_from_args"]

_FLAGS = ("bundle", "host", "port", "data_dir", "device", "dtype", "max_batch_size", "max_wait_ms", "max_queue",
          "bank_device_budget_mb", "compile_mode", "image_decoder", "api_key")


def settings_from_args(args: argparse.Namespace) -> Settings:
    from model.bundle import read_manifest
    from service.settings import Settings

    given = {k: getattr(args, k) for k in _FLAGS if getattr(args, k, None) is not None}
    try:
        settings = Settings(**given)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
                             for err in e.errors())
        raise ValueError(f"invalid settings: {problems}") from None
    read_manifest(settings.bundle)  # fail now, in one line, rather than in the background start-up
    return settings


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.app import create_app

    settings = settings_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
