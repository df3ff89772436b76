"""ServiceStatus: where start-up and shutdown stand; /readyz and every route's readiness check read it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServiceStatus"]


@dataclass
class ServiceStatus:
    model_loaded: bool = False
    classes_restored: bool = False
    warmed_up: bool = False
    accepting: bool = False
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.model_loaded and self.classes_restored and self.warmed_up and self.accepting
