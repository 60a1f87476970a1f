#!/bin/sh
# The one-shot bundle jobs (compose services `demo` and `mitigate`, the Kubernetes Job in deploy/k8s/):
# build a bundle in the work folder ($BNA_WORK_DIR), then roll it out in the bundle folder the gateways
# serve ($BNA_BUNDLE_DIR) without stopping them:
#
#   $BNA_BUNDLE_DIR/releases/<UTC time>-<pid>/   one complete bundle per install
#   $BNA_BUNDLE_DIR/current -> releases/<...>    what the gateways serve (`bna serve /bundle/current`)
#
#   bna-bundle-job demo [bna demo options]
#       Only when $BNA_BUNDLE_DIR/current names no bundle yet: `bna demo --out $BNA_WORK_DIR/demo`
#       builds the embedded default (BadNet-poisoned resnet18 on mnist5k, detection, twins; several
#       minutes on CPU, reusing what an earlier run there built) and its bundle is installed.
#   bna-bundle-job mitigate [bna mitigate options, without --out]
#       `bna mitigate ... --out $BNA_WORK_DIR/mitigate/bundle` (the detection lands beside it, in
#       bundle_detection/), then that bundle becomes current.
#
# Installing copies the bundle into a hidden folder, renames it into releases/ (atomic), and re-points
# `current` with `ln -sfn` + `mv -T` (rename(2): atomic), so a gateway never sees half a bundle. Every
# gateway watches the link and rolls the new bundle out itself (verify, load and warm beside the old
# one, then swap between batches); a bundle that fails to verify is refused and the old one keeps
# serving. The newest $BNA_KEEP_RELEASES releases (default 3) are kept, for a roll-back:
#   ln -sfn releases/<older> /bundle/current.tmp && mv -T /bundle/current.tmp /bundle/current
set -eu

BUNDLE_DIR="${BNA_BUNDLE_DIR:-/bundle}"
WORK_DIR="${BNA_WORK_DIR:-/work}"
KEEP="${BNA_KEEP_RELEASES:-3}"

install_bundle() {
    src="$1"
    if [ ! -f "$src/manifest.json" ]; then
        echo "bna-bundle-job: no bundle was written to $src" >&2
        exit 1
    fi
    name="$(date -u +%Y%m%dT%H%M%SZ)-$$"
    mkdir -p "$BUNDLE_DIR/releases"
    rm -rf "$BUNDLE_DIR/releases/.incoming-$name"
    cp -R "$src" "$BUNDLE_DIR/releases/.incoming-$name"
    mv "$BUNDLE_DIR/releases/.incoming-$name" "$BUNDLE_DIR/releases/$name"
    ln -sfn "releases/$name" "$BUNDLE_DIR/.current.tmp"
    mv -T "$BUNDLE_DIR/.current.tmp" "$BUNDLE_DIR/current"
    echo "bna-bundle-job: bundle from $src installed as $BUNDLE_DIR/releases/$name, now current"
    # Older releases beyond the newest $KEEP go (names sort by time); the current one always stays.
    ls -1 "$BUNDLE_DIR/releases" | sort -r | tail -n +"$((KEEP + 1))" | while read -r old; do
        [ "$old" = "$name" ] || rm -rf "${BUNDLE_DIR:?}/releases/$old"
    done
}

job="${1:-}"
[ "$#" -gt 0 ] && shift
case "$job" in
    demo)
        if [ -f "$BUNDLE_DIR/current/manifest.json" ]; then
            echo "bna-bundle-job: $BUNDLE_DIR/current already names a bundle; not building the demo"
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
