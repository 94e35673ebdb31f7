#!/bin/sh
# splitmirror-tls-init: the certificates of a compose deployment, made once.
#
#   splitmirror-tls-init TLS_DIR CA_DIR [--clients NAME[:ROLE],...] SYSTEM_ID=HOST...
#
# docker-compose.yml runs it as the one-shot service `tls-init` before any
# daemon starts.  When TLS_DIR/ca.pem exists it does nothing (the volume
# already holds the deployment's certificates: a restart, or a second `up`).
# Otherwise `splitmirror certs init` makes, in CA_DIR, a CA, one certificate
# per SYSTEM_ID naming HOST (the compose service the others dial: libnbd
# checks that name for nbds://HOST) and one per client (default
# admin,host,viewer, each with its nbd-NAME/ directory for libnbd and qemu);
# then everything but the CA's private key is published into TLS_DIR, ca.pem
# last, so that an interrupted run leaves no ca.pem and is simply redone.
# ca.key stays in CA_DIR, a volume that only this service mounts.
set -eu

usage() { echo "usage: splitmirror-tls-init TLS_DIR CA_DIR [--clients LIST] SYSTEM_ID=HOST..." >&2; exit 2; }
[ $# -ge 3 ] || usage
tls=$1
ca=$2
shift 2
clients=admin,host,viewer
if [ "$1" = --clients ]; then
    [ $# -ge 3 ] || usage
    clients=$2
    shift 2
fi

if [ -e "$tls/ca.pem" ]; then
    echo "tls-init: $tls/ca.pem exists: keeping the deployment's certificates"
    exit 0
fi

mkdir -p "$ca" "$tls"
chmod 0700 "$ca"
first=1
for system in "$@"; do
    id=${system%%=*}
    host=${system#*=}
    case "$system" in *=*) ;; *) usage ;; esac
    # One system per call: each certificate names its own host only.  The
    # first call makes the CA (or reuses the one in CA_DIR) and the clients.
    if [ "$first" = 1 ]; then with=$clients; first=0; else with=""; fi
    splitmirror certs init "$ca/certs" --systems "$id" --hosts "$host" --clients "$with" >/dev/null
    echo "tls-init: system $id: certificate for $host (and system-$id.splitmirror, splitmirror)"
done
echo "tls-init: clients: $clients"

# Publish: a fresh copy beside the target, renamed into place, ca.pem last.
stage=$(mktemp -d "$tls/.stage.XXXXXX")
(cd "$ca/certs" && tar -cf - --exclude=./ca.key --exclude=./ca.pem .) | tar -xpf - -C "$stage"
for entry in "$stage"/* ; do
    name=${entry##*/}
    rm -rf "${tls:?}/$name"
    mv "$entry" "$tls/$name"
done
rmdir "$stage"
cp -p "$ca/certs/ca.pem" "$tls/.ca.pem.tmp"
mv "$tls/.ca.pem.tmp" "$tls/ca.pem"
echo "tls-init: certificates in $tls (the CA key stays in $ca)"
