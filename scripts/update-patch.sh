#!/usr/bin/env bash
# For developers of the patches: after editing target/patched/<crate>-<version>, write the
# difference against the pristine published crate to patches/<crate>+<version>.patch (and
# re-stamp the copy so that prepare-patched-crates.sh does not unpack it again).
# Usage: scripts/update-patch.sh [CRATE]   (default: every patched crate)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cargo fetch --quiet --manifest-path "$root/patches/pristine/Cargo.toml"

for patch_file in "$root"/patches/*+*.patch; do
  name="$(basename "$patch_file" .patch)"
  crate="${name%+*}"
  version="${name#*+}"
  [ -z "${1:-}" ] || [ "$1" = "$crate" ] || continue
  dest="$root/target/patched/$crate-$version"
  [ -d "$dest" ] || { echo "update-patch: $dest does not exist; run scripts/prepare-patched-crates.sh" >&2; exit 1; }
  archive="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$version.crate" | head -n1)"

  tmp="$(mktemp -d)"
  tar -xzf "$archive" -C "$tmp"
  mv "$tmp/$crate-$version" "$tmp/a"
  ln -s "$dest" "$tmp/b"
  # diff exits 1 when the trees differ, which is the point.
  (cd "$tmp" && diff -ruN --exclude=.git --exclude=.logquant-patch.sha256 a b || true) \
    | sed -E 's/^(---|\+\+\+) ([^\t]*)\t.*$/\1 \2/' > "$patch_file"
  rm -rf "$tmp"
  sha256sum "$patch_file" | cut -d' ' -f1 > "$dest/.logquant-patch.sha256"
  echo "update-patch: wrote $patch_file ($(grep -c '^+++ ' "$patch_file") files)"
done
