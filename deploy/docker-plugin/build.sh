#!/usr/bin/env bash
# Builds the managed Docker plugin's directory: DIR/config.json and
# DIR/rootfs with the release `cairn` binary and the programs it runs
# (mkfs, fsck, resize, blkid) plus their shared libraries, copied from this
# machine. Then:
#
#   deploy/docker-plugin/build.sh /tmp/cairn-plugin
#   docker plugin create cairn/cairn:0.1.0 /tmp/cairn-plugin
#   docker plugin enable cairn/cairn:0.1.0
#   docker volume create -d cairn/cairn:0.1.0 --opt size=1GiB data
#
# The plugin keeps its data in /var/lib/cairn on the host (created here;
# `docker plugin set NAME data.source=DIR` before enabling picks another).
# CAIRN_BIN=PATH packs that binary instead of building a release one;
# CAIRN_PLUGIN_DATA=DIR creates that host directory instead of /var/lib/cairn.
set -euo pipefail
OUT=${1:?usage: build.sh OUTPUT-DIR}
cd "$(dirname "$0")/../.."
BIN=${CAIRN_BIN:-}
if [ -z "$BIN" ]; then cargo build --release --bin cairn >&2; BIN=target/release/cairn; fi
rm -rf "$OUT"; mkdir -p "$OUT/rootfs"/{usr/bin,usr/sbin,var/lib/cairn,mnt/volumes,run/docker/plugins,tmp,proc,sys,dev,etc}
cp deploy/docker-plugin/config.json "$OUT/config.json"
# The host directory the plugin's "data" mount binds (see the note above).
mkdir -p "${CAIRN_PLUGIN_DATA:-/var/lib/cairn}"
copy() { # a program and every library it links
  local p; p=$(command -v "$1")
  mkdir -p "$OUT/rootfs$(dirname "$p")"; cp -L "$p" "$OUT/rootfs$p"
  ldd "$p" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$OUT/rootfs$(dirname "$lib")"; cp -Ln "$lib" "$OUT/rootfs$lib"
  done
}
cp "$BIN" "$OUT/rootfs/usr/bin/cairn"
ldd "$BIN" | grep -o '/[^ ]*' | while read -r lib; do
  mkdir -p "$OUT/rootfs$(dirname "$lib")"; cp -Ln "$lib" "$OUT/rootfs$lib"
done
for prog in mkfs.ext4 mke2fs e2fsck resize2fs dumpe2fs mkfs.xfs xfs_growfs blkid; do copy "$prog"; done
# mke2fs reads its defaults from here.
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$OUT/rootfs/etc/"
echo "$OUT"
