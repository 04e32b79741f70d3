#!/usr/bin/env bash
# Builds the image the Kubernetes manifests run, offline: the managed Docker
# plugin's root filesystem (the release `cairn` binary plus mkfs, fsck,
# resize, blkid and their libraries from this machine) with a static
# busybox as /bin/sh, imported with `docker import`.
#
#   deploy/kubernetes/image/build.sh [TAG]     # default cairn/cairn:0.1.0
#
# CAIRN_BIN=PATH packs that binary instead of building a release one. Needs
# docker and busybox-static (apt-get install busybox-static).
set -euo pipefail
TAG=${1:-cairn/cairn:0.1.0}
cd "$(dirname "$0")/../../.."
BUSYBOX=$(command -v busybox) || { echo "busybox (static) is needed for /bin/sh" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
CAIRN_PLUGIN_DATA="$WORK/unused-data" deploy/docker-plugin/build.sh "$WORK/plugin" >/dev/null
ROOT="$WORK/plugin/rootfs"
mkdir -p "$ROOT/bin"
cp "$BUSYBOX" "$ROOT/bin/busybox"
ln -sf busybox "$ROOT/bin/sh"
tar -C "$ROOT" -c . | docker import \
  --change 'ENTRYPOINT ["/usr/bin/cairn"]' \
  --change 'CMD ["node", "run"]' \
  --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
  - "$TAG" >/dev/null
echo "$TAG"
