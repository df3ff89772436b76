"""service/core/errors.py: one tree, and a registry by code that holds every class of it."""

from __future__ import annotations

import inspect

from service.core import errors


def test_every_error_class_is_registered_under_a_code_of_its_own() -> None:
    defined = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, errors.SowaError) and cls.__module__ == errors.__name__]
    assert errors.ResultNotFoundError in defined and errors.ShotNotFoundError in defined
    assert sorted(errors.BY_CODE.values(), key=lambda c: c.__name__) == sorted(defined, key=lambda c: c.__name__)
    assert len({cls.code for cls in defined}) == len(defined), "two error classes share a code"
    for code, cls in errors.BY_CODE.items():
        assert cls.code == code


def test_moved_errors_keep_their_status_and_code() -> None:
    assert (errors.ResultNotFoundError.status, errors.ResultNotFoundError.code) == (404, "result_not_found")
    assert (errors.ShotNotFoundError.status, errors.ShotNotFoundError.code) == (404, "shot_not_found")
