#!/usr/bin/env bash
# Installs Debian's `prometheus` package (the prometheus server and promtool) into the tests' tool
# cache once per package version, without root: `apt-get download` fetches the .deb and `dpkg -x`
# unpacks it. Only its two binaries are used, and they need nothing but libc (the package's other
# dependencies are the web UI's JavaScript and the init scripts' system user), so no other package
# is installed. Safe to run concurrently and to interrupt: the package is unpacked into a temporary
# directory that is renamed into place when complete.
# Prints the directory holding `prometheus` and `promtool` as its last line of stdout.
set -euo pipefail

CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/tools
mkdir -p "$CACHE"

# As root, apt would hand downloads to its `_apt` user, who cannot write to the cache.
APT=(-o "APT::Sandbox::User=$(id -un)")
# The candidate version, or nothing when apt has no list that names the package.
version() { apt-cache "${APT[@]}" show --no-all-versions prometheus 2>/dev/null |
    sed -n 's/^Version: //p' || true; }
VERSION=$(version)
# Where the system's package lists were never fetched (and only root may fetch them), apt reads
# and, once, writes lists of its own under the cache.
if [ -z "$VERSION" ]; then
    LISTS=$CACHE/.apt
    APT+=(-o "Dir::State::Lists=$LISTS/lists" -o "Dir::Cache=$LISTS" -o Debug::NoLocking=1)
    VERSION=$(version)
fi
if [ -z "$VERSION" ]; then
    echo "fetching Debian's package lists into $LISTS" >&2
    mkdir -p "$LISTS/lists/partial" "$LISTS/archives/partial"
    apt-get "${APT[@]}" -qq update >&2
    VERSION=$(version)
fi
test -n "$VERSION" || { echo "prometheus.sh: apt knows no package prometheus" >&2; exit 1; }

# Debian versions hold `+` and `:`, fine in a path but not in every tool's arguments.
DIR=$CACHE/prometheus-${VERSION//[:+~]/_}

if [ ! -x "$DIR/promtool" ]; then
    echo "installing prometheus $VERSION into $DIR" >&2
    TMP=$(mktemp -d "$CACHE/.prometheus.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    chmod 755 "$TMP"
    (cd "$TMP" && apt-get "${APT[@]}" -qq download "prometheus=$VERSION" >&2)
    dpkg -x "$TMP"/prometheus_*.deb "$TMP/root"
    mkdir "$TMP/bin"
    mv "$TMP/root/usr/bin/prometheus" "$TMP/root/usr/bin/promtool" "$TMP/bin/"
    "$TMP/bin/promtool" --version >/dev/null
    # A concurrent install may have won the race; its result is as good as ours.
    mv -T "$TMP/bin" "$DIR" 2>/dev/null || test -x "$DIR/promtool"
fi
echo "$DIR"
