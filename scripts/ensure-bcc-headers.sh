#!/usr/bin/env bash
# Give bcc kernel headers it can compile against on a kernel Debian has no headers for.
# Debian's linux-headers-amd64 (6.1) are merged into one tree: the -common tree, then the
# -amd64 tree over it (`cp -as`, symlinks only).  The eBPF backend names that tree in
# BCC_KERNEL_SOURCE (redirect/ebpf/loader.py).  Idempotent: a stamp names the sources merged.
set -euo pipefail
DEST=${NODEPROXY_BCC_HEADERS:-/usr/src/nodeproxy-bcc-headers}
if [ -d "/lib/modules/$(uname -r)/build/include" ]; then
  exit 0  # the running kernel has its own headers; bcc finds them
fi
arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | grep -v -- '-rt-\|-cloud-' | sort -V | tail -1 || true)
if [ -z "$arch" ]; then
  echo "nodeproxy: no linux-headers-*-amd64 under /usr/src (apt-get install linux-headers-amd64)" >&2
  exit 1
fi
common=${arch%-amd64}-common
stamp="$arch $common"
if [ -f "$DEST/.nodeproxy-stamp" ] && [ "$(cat "$DEST/.nodeproxy-stamp")" = "$stamp" ]; then
  exit 0
fi
echo "==> merging $common and $arch into $DEST for bcc"
tmp="$DEST.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
cp -as "$common/." "$tmp/"
cp -asf "$arch/." "$tmp/"
echo "$stamp" > "$tmp/.nodeproxy-stamp"
rm -rf "$DEST"
mv "$tmp" "$DEST"
