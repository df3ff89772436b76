"""The service's errors: one tree, one JSON shape `{"error": {"code", "message"}}`.

Plain exceptions with their HTTP status and code as data: the core raises them without knowing HTTP;
`handlers.py` turns them into responses.
"""

from __future__ import annotations

import errno

__all__ = [
    "BY_CODE",
    "DISK_FULL_ERRNOS",
    "ClassDamagedError",
    "ClassNotFoundError",
    "ClientClosedError",
    "DeadlineExceededError",
    "ForbiddenError",
    "InsufficientStorageError",
    "InvalidImageError",
    "KeyExistsError",
    "KeyNotFoundError",
    "NotReadyError",
    "PayloadTooLargeError",
    "QueueFullError",
    "RecordNotFoundError",
    "RecordsUnavailableError",
    "ResultNotFoundError",
    "ShotNotFoundError",
    "SowaError",
    "StoreUnavailableError",
    "TooManyClassesError",
    "UnauthorizedError",
    "UnprocessableError",
    "error_body",
]


class SowaError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.headers = message, headers


class InvalidImageError(SowaError):
    status, code = 400, "invalid_image"


class UnauthorizedError(SowaError):
    status, code = 401, "unauthorized"


class ForbiddenError(SowaError):
    status, code = 403, "forbidden"  # a known key whose role (or class pattern) does not reach this


class ClassNotFoundError(SowaError):
    status, code = 404, "class_not_found"


class ResultNotFoundError(SowaError):
    status, code = 404, "result_not_found"


class RecordNotFoundError(SowaError):
    status, code = 404, "record_not_found"


class ShotNotFoundError(SowaError):
    status, code = 404, "shot_not_found"


class KeyNotFoundError(SowaError):
    status, code = 404, "key_not_found"


class KeyExistsError(SowaError):
    status, code = 409, "key_exists"


class ClassDamagedError(SowaError):
    status, code = 409, "class_damaged"  # stored but refused at restore: replace its shots, or delete it


class TooManyClassesError(SowaError):
    # 409, not 507: the cap is a setting (max_classes), not a full disk, so retrying later changes nothing; the
    # request conflicts with the service's state, and deleting a class (or raising the cap) resolves it
    status, code = 409, "too_many_classes"


class ModelNotFoundError(SowaError):
    status, code = 404, "model_not_found"  # no such version in the model repository


class ConflictError(SowaError):
    status, code = 409, "conflict"  # the request contradicts the state: a label taken, the active model removed


class ModelMemoryError(SowaError):
    # 409, not 507: two models would not fit the device together; stopping a shadow (or a budget) resolves it
    status, code = 409, "insufficient_memory"


class PayloadTooLargeError(SowaError):
    status, code = 413, "payload_too_large"


class UnprocessableError(SowaError):
    status, code = 422, "invalid_request"


class ClientClosedError(SowaError):
    status, code = 499, "client_closed_request"  # nginx's convention; nobody reads it, the metrics count it


class QueueFullError(SowaError):
    status, code = 429, "queue_full"


class NotReadyError(SowaError):
    status, code = 503, "not_ready"


class StoreUnavailableError(SowaError):
    status, code = 503, "store_unavailable"  # the class store is down: registrations wait, predictions go on


class RecordsUnavailableError(SowaError):
    status, code = 503, "records_unavailable"  # unrecordable="503": the spool is full and the store unreachable


class InsufficientStorageError(SowaError):
    status, code = 507, "insufficient_storage"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, {"Retry-After": "60", **(headers or {})})


# what a full disk (or a quota, or a file size limit) raises: a client may retry later, nothing is wrong with it
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DeadlineExceededError(SowaError):
    status, code = 504, "deadline_exceeded"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}



def _by_code(classes: list[type[SowaError]]) -> dict[str, type[SowaError]]:
    out: dict[str, type[SowaError]] = {}
    for cls in classes:
        if out.setdefault(cls.code, cls) is not cls:
            raise TypeError(f"{out[cls.code].__name__} and {cls.__name__} share the code '{cls.code}'")
    return out


# Every error class of this module by its code: what a worker rebuilds an engine's error from (workers/wire.py).
# Taken from this module, not found by `__subclasses__`, which knows only the modules a process happened to
# import. Keep it last, so that a class defined above joins it (tests/service/core/test_errors.py checks).
BY_CODE = _by_code([v for v in list(globals().values()) if isinstance(v, type) and issubclass(v, SowaError)])
