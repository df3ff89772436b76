#!/usr/bin/env bash
# Prepares what must travel to a lent GPU machine for scripts/gpu_check.sh: wheels (Python 3.12, x86-64) of the
# project's runtime dependencies, and theirs, that the machine's image lacks (scripts/gpu_image_packages.txt, as
# the device tool lists it; torch 2.11 + torchvision 0.26, numpy, scipy, pillow, httpx, uvloop, timm ... are
# there), at the versions installed here; scripts/gpu_deps.py works out which. Run here, once, before the check:
#   scripts/gpu_wheels.sh            -> .whl/*.whl (a few MiB), then run the check with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
pins=$(python3 scripts/gpu_deps.py)  # name==version, the versions this machine tested
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl $pins
du -sh .whl
ls .whl
