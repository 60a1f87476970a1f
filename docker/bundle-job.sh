#!/bin/sh
# The compose one-shots `demo` and `mitigate`: build a bundle in the work volume ($BNA_WORK_DIR), then
# install it into the bundle volume the gateway serves ($BNA_BUNDLE_DIR).
#
#   bna-bundle-job demo [bna demo options]
#       Only when $BNA_BUNDLE_DIR holds no bundle yet: `bna demo --out $BNA_WORK_DIR/demo` builds the
#       embedded default (BadNet-poisoned resnet18 on mnist5k, detection, twins; several minutes on
#       CPU, reusing what an earlier run there built) and its bundle is installed.
#   bna-bundle-job mitigate [bna mitigate options, without --out]
#       `bna mitigate ... --out $BNA_WORK_DIR/mitigate/bundle` (the detection lands beside it, in
#       bundle_detection/), then the bundle replaces whatever the bundle volume held.
#
# Installing removes manifest.json first and copies it last, so a half-written bundle never looks
# complete. A running gateway keeps the bundle it loaded: restart it to serve the new one.
set -eu

BUNDLE_DIR="${BNA_BUNDLE_DIR:-/bundle}"
WORK_DIR="${BNA_WORK_DIR:-/work}"

install_bundle() {
    src="$1"
    if [ ! -f "$src/manifest.json" ]; then
        echo "bna-bundle-job: no bundle was written to $src" >&2
        exit 1
    fi
    rm -f "$BUNDLE_DIR/manifest.json"
    find "$BUNDLE_DIR" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
    for path in "$src"/*; do
        [ "$(basename "$path")" = manifest.json ] || cp -R "$path" "$BUNDLE_DIR"/
    done
    cp "$src/manifest.json" "$BUNDLE_DIR/manifest.json"
    echo "bna-bundle-job: bundle from $src installed in $BUNDLE_DIR"
}

job="${1:-}"
[ "$#" -gt 0 ] && shift
case "$job" in
    demo)
        if [ -f "$BUNDLE_DIR/manifest.json" ]; then
            echo "bna-bundle-job: $BUNDLE_DIR already holds a bundle; not building the demo"
            exit 0
        fi
        bna demo --out "$WORK_DIR/demo" "$@"
        install_bundle "$WORK_DIR/demo/bundle"
        ;;
    mitigate)
        mkdir -p "$WORK_DIR/mitigate"
        bna mitigate "$@" --out "$WORK_DIR/mitigate/bundle"
        install_bundle "$WORK_DIR/mitigate/bundle"
        ;;
    *)
        echo "usage: bna-bundle-job demo|mitigate [bna options]" >&2
        exit 2
        ;;
esac
