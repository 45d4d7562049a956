#!/usr/bin/env bash
# Fetch the pristine published mistralrs-core 0.8.1 and apply patches/mistralrs-core+0.8.1.patch
# into target/patched/mistralrs-core-0.8.1, the path that Cargo.toml's [patch.crates-io] names.
# Idempotent: does nothing when the patched copy matches the patch file. Stops with the failing
# hunk named when the patch no longer applies.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
crate="mistralrs-core"
version="0.8.1"
patch_file="$root/patches/$crate+$version.patch"
dest_parent="$root/target/patched"
dest="$dest_parent/$crate-$version"
stamp="$dest/.logquant-patch.sha256"

die() { echo "prepare-mistralrs-core: $*" >&2; exit 1; }

[ -f "$patch_file" ] || die "missing $patch_file"
want="$(sha256sum "$patch_file" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# cargo downloads the .crate and checks it against the registry index's checksum.
cargo fetch --quiet --manifest-path "$root/patches/pristine/Cargo.toml" \
  || die "cargo could not fetch $crate $version from the package registry"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
archive="$(ls "$cargo_home"/registry/cache/*/"$crate-$version.crate" 2>/dev/null | head -n1)"
[ -n "$archive" ] || die "$crate-$version.crate not found under $cargo_home/registry/cache"

mkdir -p "$dest_parent"
tmp="$(mktemp -d "$dest_parent/.unpack.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$archive" -C "$tmp"
[ -f "$tmp/$crate-$version/Cargo.toml" ] || die "$archive did not unpack to $crate-$version/"

if ! out="$(patch -p1 --batch --forward --dry-run -d "$tmp/$crate-$version" -i "$patch_file" 2>&1)"; then
  echo "$out" | grep -E "FAILED|can't find file|malformed|Reversed" >&2 || echo "$out" >&2
  die "$(basename "$patch_file") does not apply to pristine $crate $version (failing hunks above)"
fi
patch -p1 --batch --forward --silent -d "$tmp/$crate-$version" -i "$patch_file"
echo "$want" > "$tmp/$crate-$version/.logquant-patch.sha256"

rm -rf "$dest"
mv "$tmp/$crate-$version" "$dest"
echo "prepare-mistralrs-core: applied $(basename "$patch_file") to $dest"
