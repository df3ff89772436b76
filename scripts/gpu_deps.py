"""What a lent GPU machine must be sent as wheels: the project's runtime dependencies, and theirs, that its image
lacks (scripts/gpu_image_packages.txt). Prints `name==version` per package, at the version installed here (the
one the suite tested), for scripts/gpu_wheels.sh to download for Python 3.12.

    python3 scripts/gpu_deps.py            # the pins, one a line
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGE = Path(__file__).with_name("gpu_image_packages.txt")
# the lent machine (device tool, KINDS.md): CPython 3.12 on x86-64 Linux
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def image_packages(path: Path = IMAGE) -> set[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return {canonicalize_name(line) for line in lines if line and not line.startswith("#")}


def project_requirements(project: str = "sowa-inspect") -> list[Requirement]:
    """The installed project's runtime requirements (pyproject's `dependencies`, not its extras)."""
    return [r for r in map(Requirement, requires(project) or []) if _applies(r, set())]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**TARGET, "extra": extra}) for extra in extras | {""})


def missing(roots: list[Requirement], image: set[str]) -> dict[str, str]:
    """Every package the roots need on the target, transitively, that the image lacks -> its version here.
    A package the image has is not followed: its own dependencies are the image's business. The image's
    versions are not known, so they are not checked against the requirements' specifiers."""
    found: dict[str, str] = {}
    walked: dict[str, set[str]] = {}  # the extras each package's requirements were read with
    todo = [(r, set()) for r in roots]
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in image or (name in walked and extras <= walked[name]):
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} is needed on the GPU machine but not installed here, so no version was "
                             "tested: pip install -e '.[dev]' first") from None
        found[name] = dist.version
        walked[name] = walked.get(name, set()) | extras  # reached again with new extras: read again with them
        todo += [(Requirement(r), walked[name]) for r in dist.requires or []]
    return dict(sorted(found.items()))


def main() -> int:
    for name, version in missing(project_requirements(), image_packages()).items():
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
