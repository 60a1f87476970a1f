#!/bin/sh
# One-shot for the compose service `demo`: make sure the shared bundle volume holds a bundle.
# If $BNA_BUNDLE_DIR already has a manifest.json (an earlier demo, or a bundle written by the
# `mitigate` service) nothing is done. Otherwise `bna demo` builds the embedded default
# (BadNet-poisoned resnet18 on mnist5k, detection, twins; several minutes on CPU) in $BNA_DEMO_DIR,
# reusing whatever an earlier run there already built, and its bundle is copied into the volume,
# manifest last, so that a half-copied bundle never looks complete. Extra arguments go to `bna demo`.
set -eu

BUNDLE_DIR="${BNA_BUNDLE_DIR:-/bundle}"
DEMO_DIR="${BNA_DEMO_DIR:-/demo}"

if [ -f "$BUNDLE_DIR/manifest.json" ]; then
    echo "bna-demo-bundle: $BUNDLE_DIR already holds a bundle; not building the demo"
    exit 0
fi

echo "bna-demo-bundle: no bundle in $BUNDLE_DIR; building the demo in $DEMO_DIR"
bna demo --out "$DEMO_DIR" "$@"

if [ ! -f "$DEMO_DIR/bundle/manifest.json" ]; then
    echo "bna-demo-bundle: bna demo wrote no bundle to $DEMO_DIR/bundle" >&2
    exit 1
fi
for path in "$DEMO_DIR"/bundle/*; do
    [ "$(basename "$path")" = manifest.json ] || cp -R "$path" "$BUNDLE_DIR"/
done
cp "$DEMO_DIR/bundle/manifest.json" "$BUNDLE_DIR/manifest.json"
echo "bna-demo-bundle: bundle ready in $BUNDLE_DIR"
