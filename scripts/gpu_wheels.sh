#!/usr/bin/env bash
# Prepares what must travel to a lent GPU machine for scripts/gpu_check.sh: wheels (Python 3.12, x86-64) of the
# project's dependencies that machine's image lacks, in .whl/ (ignored by git; the device tool's `carry`).
# That image has torch 2.11 + torchvision 0.26, numpy, scipy, pillow, httpx, prometheus-client, uvloop, pytest,
# timm, huggingface-hub, safetensors... (the device tool's KINDS.md lists them). Run here, once, before the check:
#   scripts/gpu_wheels.sh            -> .whl/*.whl (a few MiB), then run the check with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# the versions this machine tested (its installed ones), for the packages that image lacks
names="open_clip_torch fastapi starlette pydantic pydantic_core pydantic-settings python-multipart python-dotenv
       annotated-types typing-inspection ftfy wcwidth uvicorn httptools opentelemetry-api"
# shellcheck disable=SC2086
pins=$(python3 -m pip show $names | awk '/^Name:/{n=$2} /^Version:/{print n"=="$2}')
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl $pins
du -sh .whl
ls .whl
