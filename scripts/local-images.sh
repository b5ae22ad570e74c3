#!/usr/bin/env bash
# Only for a machine whose Docker engine cannot reach a container registry (Docker Hub): make the
# base images the stack expects, locally, from Debian's own packages. Never needed where
# `docker pull` works — the stack test (scripts/stack_test.py) calls this only when a pull fails.
#
#   scripts/local-images.sh [check|make|clean]
#
#   make   debootstrap a Debian bookworm root (minbase, the host's CA bundle copied in), import it
#          as tt-local/bookworm, and build from it, with Debian's packages:
#            python:3.11-slim-bookworm     python3.11 + venv (what docker/Dockerfile starts FROM)
#            redis:7-bookworm              Debian's redis-server 7.0
#            haproxy:lts-bookworm          Debian's haproxy 2.6
#            prom/prometheus:v2.53.0       Debian's prometheus 2.42 (the `monitoring` profile)
#          each tagged with the name docker-compose.yml uses, so compose finds it and pulls nothing.
#   check  exit 0 when all of those tags exist already
#   clean  remove them (and the debootstrap root)
#
# The images are stand-ins, not copies: paths differ (Debian puts haproxy and redis-server in
# /usr/sbin and /usr/bin), which is why docker-compose.yml always gives the full command line.
# Builds run with --network host, because an engine started with --bridge=none gives build
# containers no other network; apt inside them reaches the same Debian mirror as the host.
set -euo pipefail

ROOT=${TT_LOCAL_ROOTFS:-/var/tmp/tt-bookworm-rootfs}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=tt-local/bookworm
PYTHON_IMAGE=python:3.11-slim-bookworm
REDIS_IMAGE=redis:7-bookworm
HAPROXY_IMAGE=haproxy:lts-bookworm
PROM_IMAGE=prom/prometheus:v2.53.0
IMAGES=("$PYTHON_IMAGE" "$REDIS_IMAGE" "$HAPROXY_IMAGE" "$PROM_IMAGE")

have() { docker image inspect "$1" >/dev/null 2>&1; }

check() {
    local img missing=0
    for img in "${IMAGES[@]}"; do have "$img" || { echo "missing: $img"; missing=1; }; done
    return $missing
}

# docker build from a Dockerfile on stdin (no context): FROM the local base, one RUN, one layer
build() {
    local tag=$1
    shift
    echo "local-images: building $tag"
    docker build --network host -t "$tag" - <<EOF
FROM $BASE
$*
EOF
}

make_images() {
    if ! have "$BASE"; then
        if [[ ! -x $ROOT/usr/bin/apt-get ]]; then
            command -v debootstrap >/dev/null || { echo "local-images: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
            rm -rf "$ROOT"
            echo "local-images: debootstrap bookworm into $ROOT (a few minutes)"
            debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR"
        fi
        # the host's CA bundle, so pip inside the images trusts what the host trusts; kept beside the
        # system bundle, which installing ca-certificates in an image regenerates from Debian's list
        mkdir -p "$ROOT/etc/ssl/certs"
        cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/host-ca-bundle.crt"
        rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
        echo "local-images: importing $ROOT as $BASE"
        tar -C "$ROOT" -c . | docker import - "$BASE"
    fi
    local apt='RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends'
    local tidy='&& apt-get clean && rm -rf /var/lib/apt/lists/*'
    # pip in a virtualenv trusts its own CA list, not the system's: point it at the host's bundle
    have "$PYTHON_IMAGE" || build "$PYTHON_IMAGE" "$apt python3 python3-venv python-is-python3 $tidy
ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/host-ca-bundle.crt SSL_CERT_FILE=/etc/ssl/host-ca-bundle.crt
CMD [\"python3\"]"
    have "$REDIS_IMAGE" || build "$REDIS_IMAGE" "$apt redis-server $tidy
CMD [\"redis-server\", \"--protected-mode\", \"no\"]"
    have "$HAPROXY_IMAGE" || build "$HAPROXY_IMAGE" "$apt haproxy $tidy && mkdir -p /usr/local/etc/haproxy"
    have "$PROM_IMAGE" || build "$PROM_IMAGE" "$apt prometheus $tidy
ENTRYPOINT [\"/usr/bin/prometheus\"]"
    check
}

clean() {
    local img
    for img in "${IMAGES[@]}" "$BASE"; do docker image rm "$img" >/dev/null 2>&1 && echo "removed $img" || true; done
    rm -rf "$ROOT"
}

case ${1:-make} in
    check) check ;;
    make) make_images ;;
    clean) clean ;;
    *) echo "usage: $0 [check|make|clean]" >&2; exit 2 ;;
esac
