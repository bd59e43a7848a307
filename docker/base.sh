#!/usr/bin/env bash
# The base image, made locally (there is no image registry here): a minimal Debian bookworm root file system
# from Debian's packages (debootstrap), imported as arbiter-base:bookworm. Needs root, debootstrap, docker.
set -euo pipefail
TAG=${ARBITER_BASE_IMAGE:-arbiter-base:bookworm}
if docker image inspect "$TAG" > /dev/null 2>&1; then
    echo "base image $TAG exists"; exit 0
fi
ROOTFS=$(mktemp -d /tmp/arbiter-rootfs.XXXX)
trap 'rm -rf "$ROOTFS"' EXIT
# Python 3.11 is bookworm's python3, the same minor version as the host that builds the wheelhouse.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,curl bookworm "$ROOTFS" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$TAG"
echo "imported $TAG"
