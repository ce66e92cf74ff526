#!/usr/bin/env bash
# Builds the integration tests' Kubernetes (kube-apiserver, kube-controller-manager and etcd for the
# control plane; kube-scheduler, kubelet and kube-proxy for the real node of tests/node; from the Go
# modules beside this script) and fetches Kubeflow's PyTorchJob CRD, once per set of inputs:
# the cache directory's name holds the versions and a hash of this script and those modules, so
# changing any of them builds afresh. Safe to run concurrently and to interrupt: everything is built
# in a temporary directory that is renamed into place when complete.
# Prints the directory of the binaries as its last line of stdout; the CRD lies in its parent.
set -euo pipefail

# The Kubeflow training-operator release whose PyTorchJob CRD the tests install.
TRAINING_OPERATOR=v1.9.3

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

# The version a go.mod requires of a module (in a `require` line or block).
required() { awk -v m="$2" '{ sub(/^require /, "") } $1 == m { print $2; exit }' "$1"; }
K8S=$(required "$HERE/kubernetes/go.mod" k8s.io/kubernetes)
ETCD=$(required "$HERE/etcd/go.mod" go.etcd.io/etcd/server/v3)
INPUTS=(build.sh kubernetes/go.mod kubernetes/go.sum kubernetes/tools.go
    etcd/go.mod etcd/go.sum etcd/main.go)
HASH=$(cd "$HERE" && sha256sum "${INPUTS[@]}" | sha256sum | cut -c1-12)
CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/controlplane
DIR=$CACHE/k8s-$K8S-etcd-$ETCD-$HASH

if [ ! -d "$DIR" ]; then
    echo "building the test control plane into $DIR (about 12 minutes the first time)" >&2
    mkdir -p "$CACHE"
    TMP=$(mktemp -d "$CACHE/.build.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    chmod 755 "$TMP"
    mkdir "$TMP/bin"
    # Built from the module proxy, Kubernetes' commands report no version (/version, `kubectl
    # version`) unless it is stamped in, as Kubernetes' own build does.
    MINOR=$(echo "$K8S" | cut -d. -f2)
    STAMP="-X k8s.io/component-base/version.gitVersion=$K8S
        -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$MINOR
        -X k8s.io/component-base/version.gitTreeState=clean"
    BUILD=(build -mod=readonly -buildvcs=false -trimpath)
    (cd "$HERE/kubernetes" && CGO_ENABLED=0 "$GO" "${BUILD[@]}" -ldflags "-s -w $STAMP" \
        -o "$TMP/bin/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
    (cd "$HERE/etcd" && CGO_ENABLED=0 "$GO" "${BUILD[@]}" -ldflags "-s -w" -o "$TMP/bin/etcd" .)
    test "$("$TMP/bin/kube-apiserver" --version)" = "Kubernetes $K8S"

    # Outside any module, `go mod download` fetches just that module into the module cache.
    MOD=$(cd "$TMP" && "$GO" mod download -json "github.com/kubeflow/training-operator@$TRAINING_OPERATOR" |
        sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
    install -m 0644 "$MOD/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$TMP/"

    # A concurrent build may have won the race; its result is as good as ours.
    mv -T "$TMP" "$DIR" 2>/dev/null || test -d "$DIR"
fi
echo "$DIR/bin"
