#!/usr/bin/env bash
# Builds the splitmirror image (primaryd, secondaryd, client tools) with no
# container registry: `make images`.
#
#  1. Python wheels of the project and its dependencies, built here with
#     `pip wheel` (a Python 3.11 is needed: the image's Python is 3.11), into
#     docker/wheels/{deps,app}: the build needs no package index.
#  2. The base image: BASE_IMAGE (default python:3.11-slim) when it is present
#     locally; otherwise a Debian 12 base made with debootstrap --variant=minbase
#     and `docker import`, with Python and the tools already in it.  Its rootfs
#     tarball and the downloaded .debs are cached in SPLITMIRROR_IMAGE_CACHE
#     (default ~/.cache/splitmirror-images), the imported image is kept.
#  3. docker build --build-arg BASE_IMAGE=... -t SPLITMIRROR_IMAGE.
#     Skipped when the image exists and was built from the same sources and
#     base (label splitmirror.source-hash); FORCE=1 rebuilds.
#
# Environment: SPLITMIRROR_IMAGE (splitmirror:latest), BASE_IMAGE,
# DEBIAN_SUITE (bookworm), DEBIAN_MIRROR, SPLITMIRROR_IMAGE_CACHE,
# WHEEL_PYTHON (a python3.11 to run pip wheel with), FORCE.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${SPLITMIRROR_IMAGE:-splitmirror:latest}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${SPLITMIRROR_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/splitmirror-images}
# Python 3.11 with venv, and every tool docker/install-system-packages.sh
# checks for, so that the image build needs no network at all.
BASE_PACKAGES=python3,python3-venv,qemu-utils,libnbd-bin,fuse2fs,e2fsprogs,fuse3,procps
started=$(date +%s)

say() { printf '\033[1m== %s\033[0m [%ss]\n' "$*" "$(( $(date +%s) - started ))"; }
die() { echo "build-images: error: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine is reachable (docker info failed)"
if ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0  # no buildx plugin: the classic builder
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/build.lock"
flock 9  # one build at a time on this machine (wheels dir, base image)

# ------------------------------------------------------------------ base image
debootstrap_base() {
  local key tag tarball rootfs
  key=$(printf '%s %s %s' "$SUITE" "$MIRROR" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
  tag="splitmirror-base:$SUITE-$key"
  if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    return
  fi
  tarball="$CACHE/rootfs-$SUITE-$key.tar"
  if [ ! -s "$tarball" ]; then
    say "debootstrap $SUITE (minbase + $BASE_PACKAGES) into $CACHE" >&2
    if ! command -v debootstrap >/dev/null && [ ! -x /usr/sbin/debootstrap ]; then
      echo "installing debootstrap" >&2
      as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
    fi
    rootfs="$CACHE/rootfs-$SUITE-$key.tmp"
    as_root rm -rf "$rootfs"
    mkdir -p "$CACHE/debs"
    as_root env PATH="/usr/sbin:/sbin:$PATH" debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
      --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 ||
      { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
      "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
      "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/*
    as_root tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
    as_root chown "$(id -u):$(id -g)" "$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
    as_root rm -rf "$rootfs"
    find "$CACHE" -maxdepth 1 -name "rootfs-*.tar" ! -name "${tarball##*/}" -delete  # stale bases
  fi
  say "docker import $tarball as $tag" >&2
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE +$BASE_PACKAGES" \
    "$tarball" "$tag" >/dev/null
  echo "$tag"
}

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  base=$BASE_IMAGE
  say "base image: $base (present locally)"
else
  say "base image $BASE_IMAGE is not present locally (and no registry is assumed): a local Debian base"
  base=$(debootstrap_base)
  say "base image: $base"
fi
base_id=$(docker image inspect --format '{{.Id}}' "$base")

# Prometheus from Debian's package, on the same base (deploy/prometheus).
PROMETHEUS_IMAGE=${SPLITMIRROR_PROMETHEUS_IMAGE:-splitmirror-prometheus:latest}
prometheus_hash=$( { sha256sum deploy/prometheus/Dockerfile deploy/prometheus/prometheus.yml \
  deploy/prometheus/alerts.yml; echo "$base_id"; } | sha256sum | cut -c1-16)
if [ "${FORCE:-}" != 1 ] &&
   [ "$(docker image inspect --format '{{ index .Config.Labels "splitmirror.source-hash" }}' "$PROMETHEUS_IMAGE" \
        2>/dev/null)" = "$prometheus_hash" ]; then
  say "$PROMETHEUS_IMAGE is up to date"
else
  say "docker build -t $PROMETHEUS_IMAGE (Debian's prometheus package on $base)"
  docker build --force-rm --build-arg BASE_IMAGE="$base" --label "splitmirror.source-hash=$prometheus_hash" \
    -t "$PROMETHEUS_IMAGE" deploy/prometheus
fi

# --------------------------------------------------------- up to date already?
source_hash=$(
  {
    find splitmirror client primaryd secondaryd -type f \( -name '*.py' -o -name '*.pyi' -o -name py.typed \) \
      -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum
    sha256sum pyproject.toml Dockerfile .dockerignore docker/*.py docker/*.sh
    echo "$base_id"
  } | sha256sum | cut -c1-16
)
if [ "${FORCE:-}" != 1 ] &&
   [ "$(docker image inspect --format '{{ index .Config.Labels "splitmirror.source-hash" }}' "$IMAGE" 2>/dev/null)" \
     = "$source_hash" ]; then
  say "$IMAGE is up to date (sources $source_hash, base $base); FORCE=1 rebuilds"
  exit 0
fi

# ---------------------------------------------------------------------- wheels
pick_python() {
  local candidate
  for candidate in ${WHEEL_PYTHON:-} "$PWD/.venv/bin/python" python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = 3.11 ]; then
      echo "$candidate"
      return
    fi
  done
  die "no Python 3.11 found to build the wheels with (the image runs Python 3.11); set WHEEL_PYTHON"
}
py=$(pick_python)
say "wheels: $py -m pip wheel . (into docker/wheels)"
rm -rf docker/wheels/deps docker/wheels/app
mkdir -p docker/wheels/deps docker/wheels/app
# From a clean copy of the sources: an in-tree build would leave build/ and
# reuse whatever stale modules build/lib holds.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -c --exclude=__pycache__ pyproject.toml README.md splitmirror client primaryd secondaryd | tar -x -C "$src"
wheels=$PWD/docker/wheels/deps
(cd "$src" && "$py" -m pip wheel -q --disable-pip-version-check -w "$wheels" .) || die "pip wheel failed"
mv docker/wheels/deps/splitmirror-*.whl docker/wheels/app/
ls docker/wheels/deps docker/wheels/app | grep -c '\.whl$' | xargs printf '%s wheels\n'

# ----------------------------------------------------------------------- build
say "docker build -t $IMAGE --build-arg BASE_IMAGE=$base"
previous=$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
docker build --force-rm --build-arg BASE_IMAGE="$base" --label "splitmirror.source-hash=$source_hash" \
  --label "splitmirror.base-image=$base" -t "$IMAGE" .
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect --format '{{.Id}}' "$IMAGE")" ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true  # the image this one replaces, unless a container uses it
fi
say "built $IMAGE from $base in $(( $(date +%s) - started ))s"
