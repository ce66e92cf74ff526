#!/usr/bin/env bash
# Builds the images the real node runs, with buildah, from the project's own Dockerfiles:
#   ghcr.io/chatflow/trainer:0.1.0   trainer_image/Dockerfile
#   ghcr.io/chatflow/operator:0.1.0  operator/Dockerfile
#   localhost/chatflow-test/pause    the pod sandbox (pause/main.go)
# No registry serves python:3.11-slim to these machines, so both Dockerfiles are built with
# `--build-arg BASE=` a Python base that debootstrap makes from Debian's packages (bookworm's
# Python 3.11, with pip and without Debian's "externally managed" guard, as the python image).
#
# Each image is also tagged localhost/chatflow-test/<name>:<hash of its inputs> (the Dockerfile,
# the files .dockerignore lets in, the base), and is built only when that tag is missing;
# buildah's layer cache makes a rebuild after a code change redo only the last layers. The store
# lives in $CHATFLOW_CACHE_DIR/images (default ~/.cache/chatflow).
#
#   images.sh                       build what is missing; print one "<name> <image>" per line
#   images.sh --import SOCKET       and copy each into the containerd at SOCKET (namespace k8s.io)
#                                   unless it holds that image already
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/images
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
BASE_PACKAGES=python3,python3-pip,ca-certificates,passwd
BUILDAH=(buildah --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver overlay)
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml")

hash() { sha256sum "$@" | sha256sum | cut -c1-12; }
exists() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

build_base() {  # $1: image
    echo "building $1 with debootstrap (about 2 minutes)" >&2
    local container root
    container=$("${BUILDAH[@]}" from scratch)
    root=$("${BUILDAH[@]}" mount "$container")
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
    # What the python image has and the Dockerfiles rely on: `pip` and `python3` in /usr/local/bin,
    # pip allowed to install (uv) into the system, an empty /dev (the runtime mounts its own).
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -s /usr/bin/python3 "$root/usr/local/bin/python3"
    ln -s /usr/bin/pip3 "$root/usr/local/bin/pip"
    rm -rf "$root"/dev/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    # The host's own CAs: where it reaches the package registries through a TLS-inspecting
    # proxy, the builds' pip and uv must trust the proxy as the host does.
    cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
    "${BUILDAH[@]}" umount "$container" >/dev/null
    "${BUILDAH[@]}" config --env LANG=C.UTF-8 --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
        --cmd python3 "$container"
    "${BUILDAH[@]}" commit --rm -q "$container" "$1" >/dev/null
}

build_pause() {  # $1: image
    local container tmp
    tmp=$(mktemp -d)
    (cd "$HERE/pause" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags "-s -w" -o "$tmp/pause" main.go)
    container=$("${BUILDAH[@]}" from scratch)
    "${BUILDAH[@]}" copy -q "$container" "$tmp/pause" /pause
    "${BUILDAH[@]}" config --entrypoint '["/pause"]' "$container"
    "${BUILDAH[@]}" commit --rm -q "$container" "$1" >/dev/null
    rm -rf "$tmp"
}

build_dockerfile() {  # $1: Dockerfile, $2: image, $3: release tag
    echo "building $3 from ${1#"$REPO"/} with buildah" >&2
    # chroot isolation: the default (oci) makes a CNI bridge on the pod network's range.
    (cd "$REPO" && "${BUILDAH[@]}" bud --isolation chroot --layers --quiet \
        --build-arg BASE="$BASE" -f "$1" -t "$3" -t "$2" .) >&2
}

# The files of the build context (.dockerignore's allowlist) that the image's Dockerfile copies.
context() {
    local sources=(pyproject.toml uv.lock README.md trainer_image/chatflow)
    [ "$1" = operator ] && sources+=(operator/chatflow_operator)
    (cd "$REPO" && find "${sources[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | sort)
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one build at a time: buildah's store and the base's debootstrap

# Keyed by what makes it: editing the rest of this script does not rebuild it.
BASE=localhost/chatflow-test/python-base:$SUITE-$({ declare -f build_base; echo "$MIRROR $BASE_PACKAGES"; } | sha256sum | cut -c1-12)
exists "$BASE" || build_base "$BASE"
PAUSE=localhost/chatflow-test/pause:$(hash "$HERE/pause/main.go")
exists "$PAUSE" || build_pause "$PAUSE"
declare -A IMAGES=([pause]=$PAUSE)
for name in trainer operator; do
    mapfile -t FILES < <(context $name)
    dockerfile=$REPO/$( [ $name = trainer ] && echo trainer_image || echo operator )/Dockerfile
    inputs=$(cd "$REPO" && { echo "$BASE"; hash "$dockerfile" .dockerignore "${FILES[@]}"; } | sha256sum | cut -c1-12)
    image=localhost/chatflow-test/$name:$inputs
    exists "$image" || build_dockerfile "$dockerfile" "$image" "ghcr.io/chatflow/$name:$VERSION"
    IMAGES[$name]=$image
done
# Only the current images are kept (the trainer's is gigabytes), with the layers they use: the
# cache of the next build after a code change.
"${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}}' | while read -r old; do
    case $old in
    localhost/chatflow-test/*) [[ " ${IMAGES[*]} $BASE " == *" $old "* ]] || "${BUILDAH[@]}" rmi -f "$old" >/dev/null ;;
    esac
done
"${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true

if [ "${1:-}" = --import ]; then
    CTR=(ctr --address "$2" --namespace k8s.io)
    for name in pause operator trainer; do
        image=${IMAGES[$name]}
        "${CTR[@]}" images check "name==$image" 2>/dev/null | grep -q complete && continue
        echo "importing $image into containerd" >&2
        archive=$CACHE/.import-$name.tar
        # Uncompressed: gzip of the trainer's gigabytes would take minutes of one core.
        "${BUILDAH[@]}" push -q --disable-compression "$image" "oci-archive:$archive:$image" >&2
        # The archive names only the hash tag; the release tag is set on containerd's side.
        "${CTR[@]}" images import --no-unpack=false "$archive" >&2
        rm -f "$archive"
        [ $name = pause ] || "${CTR[@]}" images tag --force "$image" "ghcr.io/chatflow/$name:$VERSION" >/dev/null
        # The image it replaces, and (--sync) the content and snapshots only that one used.
        "${CTR[@]}" images ls -q "name~=^localhost/chatflow-test/$name:" |
            { grep -vxF "$image" || true; } | xargs -r "${CTR[@]}" images rm --sync >/dev/null
    done
fi
for name in pause trainer operator; do echo "$name ${IMAGES[$name]}"; done
