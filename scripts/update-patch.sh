#!/usr/bin/env bash
# For developers of the patch: after editing target/patched/mistralrs-core-0.8.1, write the
# difference against the pristine published crate to patches/mistralrs-core+0.8.1.patch (and
# re-stamp the copy so that prepare-mistralrs-core.sh does not unpack it again).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
crate="mistralrs-core"
version="0.8.1"
patch_file="$root/patches/$crate+$version.patch"
dest="$root/target/patched/$crate-$version"

[ -d "$dest" ] || { echo "update-patch: $dest does not exist; run scripts/prepare-mistralrs-core.sh" >&2; exit 1; }
cargo fetch --quiet --manifest-path "$root/patches/pristine/Cargo.toml"
archive="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$version.crate" | head -n1)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$archive" -C "$tmp"
mv "$tmp/$crate-$version" "$tmp/a"
ln -s "$dest" "$tmp/b"
# diff exits 1 when the trees differ, which is the point.
(cd "$tmp" && diff -ruN --exclude=.git --exclude=.logquant-patch.sha256 a b || true) \
  | sed -E 's/^(---|\+\+\+) ([^\t]*)\t.*$/\1 \2/' > "$patch_file"
sha256sum "$patch_file" | cut -d' ' -f1 > "$dest/.logquant-patch.sha256"
echo "update-patch: wrote $patch_file ($(grep -c '^+++ ' "$patch_file") files)"
