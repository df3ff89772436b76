"""Class names: the one pattern a class name must match before it names anything, a route, a file or a row."""

from __future__ import annotations

import re

from .errors import UnprocessableError

__all__ = ["CLASS_NAME", "check_class_name", "is_class_name"]

CLASS_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def is_class_name(name: str) -> bool:
    return CLASS_NAME.fullmatch(name) is not None


def check_class_name(name: str) -> str:
    """`name` itself, or a 422 naming the rule."""
    if not is_class_name(name):
        raise UnprocessableError(f"invalid class name {name[:80]!r}: use 1-64 characters of a-z, 0-9, '_', '.', "
                                 "'-', starting with a letter or digit")
    return name
