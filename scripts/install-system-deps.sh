#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use, when missing:
# qemu-io/qemu-img (qemu-utils), nbdinfo/nbdcopy (libnbd-bin), nbdfuse,
# nbdkit (benchmark baseline), nbdsh + the libnbd Python binding (python3-libnbd), fuse2fs + e2fsprogs (filesystem round trips),
# fuse3 (fusermount3), rsync (resync benchmark baseline), prometheus + promtool
# (metrics and alert rule tests).
set -euo pipefail

declare -A want=(
  [qemu-io]=qemu-utils [qemu-img]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=nbdfuse
  [nbdkit]=nbdkit [fuse2fs]=fuse2fs [mke2fs]=e2fsprogs [e2fsck]=e2fsprogs
  [fusermount3]=fuse3 [rsync]=rsync [prometheus]=prometheus [promtool]=prometheus [nbdsh]=python3-libnbd
)
missing=()
for tool in "${!want[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ] && [ ! -x "/sbin/$tool" ]; then
    missing+=("${want[$tool]}")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "system packages: installing ${pkgs[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
