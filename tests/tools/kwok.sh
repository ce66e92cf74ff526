#!/usr/bin/env bash
# Installs kwok (fake nodes and a fake pod lifecycle on a real kube-apiserver), built from the Go
# module proxy, into the tests' tool cache once per version, with `stages.yaml` beside the binary:
# kwok's own default lifecycle (what kwokctl gives a cluster: kustomize/stage/fast in its module)
# as one file of Stage objects only, in this order:
#   node-initialize              a Node kwok manages becomes Ready, its status filled in
#   node-heartbeat-with-lease    refreshes its conditions every 10 minutes; kwok's Lease in
#                                kube-node-lease is what keeps it Ready
#   pod-ready                    a Pod bound to such a Node becomes Running and Ready
#   pod-complete                 a Running Pod owned by a Job becomes Succeeded (no other Pod
#                                ever completes by itself)
#   pod-delete                   a Pod being deleted is removed
# Use it as `kwok -c <dir>/stages.yaml --kubeconfig=... --node-lease-duration-seconds=40
# --manage-all-nodes=false --manage-nodes-with-label-selector=... --cidr=... --node-ip=...`.
# Standalone kwok keeps no Leases unless --node-lease-duration-seconds is set (kwokctl sets 40);
# without them nothing renews the Node for 10 minutes (we saw its Ready condition rewritten by
# node-initialize after about 50 s, the node controller's grace period). A file that holds a
# whole KwokConfiguration fails instead ("playStageParallelism must be greater than 0").
# Measured on the tests' control plane: a Node Ready in under 1 s, a Pod Running and a Job
# Complete 1-2 s later.
# Safe to run concurrently and to interrupt: everything is built into a temporary directory that
# is renamed into place when complete.
# Prints the path of the kwok binary as its last line of stdout; stages.yaml lies in its directory.
set -euo pipefail

KWOK=v0.8.0

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/tools
DIR=$CACHE/kwok-$KWOK

if [ ! -x "$DIR/kwok" ]; then
    echo "building kwok $KWOK into $DIR (a few minutes the first time)" >&2
    mkdir -p "$CACHE"
    TMP=$(mktemp -d "$CACHE/.kwok.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    chmod 755 "$TMP"
    # kwok reports its version as a constant of the source, which its release build overrides.
    CGO_ENABLED=0 GOBIN=$TMP nice -n 10 "$GO" install -trimpath \
        -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK#v}" \
        "sigs.k8s.io/kwok/cmd/kwok@$KWOK"

    # Outside any module, `go mod download` fetches just that module into the module cache.
    MOD=$(cd "$TMP" && "$GO" mod download -json "sigs.k8s.io/kwok@$KWOK" |
        sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
    STAGES=(node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
        pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml)
    for f in "${STAGES[@]}"; do
        echo "---"
        echo "# kustomize/stage/$f of sigs.k8s.io/kwok@$KWOK"
        cat "$MOD/kustomize/stage/$f"
    done >"$TMP/stages.yaml"
    chmod 644 "$TMP/stages.yaml"
    # A concurrent build may have won the race; its result is as good as ours.
    mv -T "$TMP" "$DIR" 2>/dev/null || test -x "$DIR/kwok"
fi
echo "$DIR/kwok"
