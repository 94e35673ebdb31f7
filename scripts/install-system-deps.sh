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
  [zsh]=zsh
)
missing=()
for tool in "${!want[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ] && [ ! -x "/sbin/$tool" ]; then
    missing+=("${want[$tool]}")
  fi
done
# The backup examples' PostgreSQL probe needs the server, whose binaries are off the PATH.
if [ ! -x /usr/lib/postgresql/15/bin/pg_ctl ]; then
  missing+=(postgresql-15)
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "system packages: installing ${pkgs[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# Another install may hold the package manager's locks (unattended upgrades,
# a second checkout running make install): wait for it instead of failing.
LOCK_WAIT=${SPLITMIRROR_APT_LOCK_WAIT:-600}
apt_get() {
  local deadline=$((SECONDS + LOCK_WAIT)) out status
  while :; do
    status=0
    out=$($SUDO apt-get -o DPkg::Lock::Timeout="$LOCK_WAIT" "$@" 2>&1) || status=$?
    if [ "$status" -eq 0 ]; then return 0; fi
    if ! grep -qiE 'could not get lock|unable to acquire|is another process using it' <<<"$out" \
        || [ "$SECONDS" -ge "$deadline" ]; then
      printf '%s\n' "$out" >&2
      return "$status"
    fi
    echo "system packages: waiting for another package manager to finish..." >&2
    sleep "${SPLITMIRROR_APT_RETRY_SECONDS:-5}"
  done
}
apt_get update -qq
apt_get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
