#!/usr/bin/env bash
# Make a Debian bookworm base image with Python 3.11 from the Debian archive, for building the
# images without a registry of images (Dockerfile: --build-arg BASE=NAME).
#   bash deploy/base-image.sh NAME [MIRROR]
# MIRROR defaults to the archive this machine's apt uses (the first URIs line of
# /etc/apt/sources.list.d/debian.sources, or the first deb line of /etc/apt/sources.list).
# Needs root, debootstrap, and podman or docker (podman when both are installed).
set -euo pipefail
name=${1:?usage: base-image.sh NAME [MIRROR]}
mirror=${2:-}
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $2 !~ /^\[/ { print $2; exit }' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "base-image.sh: no Debian mirror found; pass one" >&2; exit 2; }
engine=$(command -v podman || command -v docker) || { echo "base-image.sh: neither podman nor docker" >&2; exit 2; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { cat "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# What the image does not need: downloaded packages and package lists (apt-get update fetches them).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$engine" import --change 'CMD ["python3"]' - "$name" >/dev/null
echo "$name"
