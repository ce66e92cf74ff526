#!/usr/bin/env bash
# Installs helm, built from the Go module proxy, into the tests' tool cache once per version. Safe
# to run concurrently and to interrupt: the binary is built into a temporary directory that is
# renamed into place when complete.
# Prints the path of the helm binary as its last line of stdout.
set -euo pipefail

HELM=v4.3.1

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/tools
DIR=$CACHE/helm-$HELM

if [ ! -x "$DIR/helm" ]; then
    echo "building helm $HELM into $DIR (a few minutes the first time)" >&2
    mkdir -p "$CACHE"
    TMP=$(mktemp -d "$CACHE/.helm.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    chmod 755 "$TMP"
    # Built from the module proxy, helm reports only its minor version (v4.3) unless the full one
    # is stamped in, as helm's own release build does.
    CGO_ENABLED=0 GOBIN=$TMP "$GO" install -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM" \
        "helm.sh/helm/v4/cmd/helm@$HELM"
    # A concurrent build may have won the race; its result is as good as ours.
    mv -T "$TMP" "$DIR" 2>/dev/null || test -x "$DIR/helm"
fi
echo "$DIR/helm"
