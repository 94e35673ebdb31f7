#!/bin/sh
# Run inside `docker build`: makes sure the image has Python 3 with venv and
# the tools the daemons and host containers use, installing from the Debian
# archive only what the base image lacks.  The debootstrapped base of
# scripts/build-images.sh already has everything (no network needed then);
# an official python:3.11-slim image gets the tools from apt.
#
#   python3 -m venv   python3 python3-venv (skipped when the base has a Python)
#   qemu-io qemu-img  qemu-utils
#   qemu-nbd          qemu-utils (the restore agent attaches nbds:// exports through it)
#   nbdcopy nbdinfo   libnbd-bin
#   nbdfuse           libnbd-bin (Debian 12) or nbdfuse (Debian 13+)
#   fuse2fs           fuse2fs
#   mke2fs debugfs    e2fsprogs
#   fusermount3       fuse3
set -eu

need=""
add() { case " $need " in *" $1 "*) ;; *) need="$need $1" ;; esac; }
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    add python3
    add python3-venv
fi
have qemu-io || add qemu-utils
have qemu-img || add qemu-utils
have qemu-nbd || add qemu-utils
have nbdcopy || add libnbd-bin
have nbdinfo || add libnbd-bin
have fuse2fs || add fuse2fs
have mke2fs || add e2fsprogs
have debugfs || add e2fsprogs
have fusermount3 || add fuse3

if [ -n "$need" ] || ! have nbdfuse; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if ! have nbdfuse; then
        # Debian 13 split nbdfuse out of libnbd-bin.
        if apt-cache show nbdfuse 2>/dev/null | grep -q "^Package: nbdfuse$"; then add nbdfuse; else add libnbd-bin; fi
    fi
    echo "installing from the Debian archive:$need"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/*
else
    echo "system packages: all present in the base image"
fi

missing=""
for tool in python3 qemu-io qemu-img qemu-nbd nbdcopy nbdinfo nbdfuse fuse2fs mke2fs fusermount3; do
    have "$tool" || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    echo "error: still missing after install:$missing" >&2
    exit 1
fi
case "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" in
    3.11) ;;
    *) echo "error: the image's python3 is $(python3 -V 2>&1); the wheels in docker/wheels are built for 3.11" >&2
       exit 1 ;;
esac
