#!/usr/bin/env bash
# The wheels a GPU lease needs, into .whl (git-ignored), for the device image's Python 3.12:
#   scripts/gpu_wheels.sh [PYTHON]   PYTHON: a pip that can download (default python3)
# On the device: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
# then PYTHONPATH=/tmp/site for scripts/gpu_record.py and scripts/gpu_profile.py.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
rm -rf .whl && mkdir .whl
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl -r scripts/gpu-wheels.txt
du -sh .whl
