#!/usr/bin/env bash
# Installs CoreDNS, built from the Go module proxy with only the plugins a test cluster's DNS needs
# (the wrapper module in coredns/ beside this script selects them), into the tests' tool cache once
# per set of inputs: the directory's name holds the CoreDNS version and a hash of this script and
# the wrapper module, so changing either builds afresh. Safe to run concurrently and to interrupt:
# the binary is built into a temporary directory that is renamed into place when complete.
# Prints the path of the coredns binary as its last line of stdout; `coredns -plugins` lists the
# plugins it holds, one name a line: bind cache debug dnstap errors forward health hosts kubernetes
# loadbalance log loop metadata prometheus ready reload template transfer.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

# The version a go.mod requires of a module (in a `require` line or block).
required() { awk -v m="$2" '{ sub(/^require /, "") } $1 == m { print $2; exit }' "$1"; }
COREDNS=$(required "$HERE/coredns/go.mod" github.com/coredns/coredns)
HASH=$(cd "$HERE" && sha256sum coredns.sh coredns/go.mod coredns/go.sum coredns/main.go |
    sha256sum | cut -c1-12)
CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/tools
DIR=$CACHE/coredns-$COREDNS-$HASH

if [ ! -x "$DIR/coredns" ]; then
    echo "building coredns $COREDNS into $DIR (a few minutes the first time)" >&2
    mkdir -p "$CACHE"
    TMP=$(mktemp -d "$CACHE/.coredns.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    chmod 755 "$TMP"
    (cd "$HERE/coredns" && CGO_ENABLED=0 nice -n 10 "$GO" build -mod=readonly -buildvcs=false \
        -trimpath -ldflags "-s -w" -o "$TMP/coredns" .)
    "$TMP/coredns" -plugins | grep -qx kubernetes ||
        { echo "coredns.sh: the built coredns lacks the kubernetes plugin" >&2; exit 1; }
    # A concurrent build may have won the race; its result is as good as ours.
    mv -T "$TMP" "$DIR" 2>/dev/null || test -x "$DIR/coredns"
fi
echo "$DIR/coredns"
