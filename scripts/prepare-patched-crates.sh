#!/usr/bin/env bash
# For every patches/<crate>+<version>.patch: fetch the pristine published crate and apply the
# patch into target/patched/<crate>-<version>, the path that Cargo.toml's [patch.crates-io]
# names. Idempotent: does nothing for a crate whose patched copy matches its patch file. Stops
# with the failing hunk named when a patch no longer applies.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_parent="$root/target/patched"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
fetched=false

die() { echo "prepare-patched-crates: $*" >&2; exit 1; }

shopt -s nullglob
patches=("$root"/patches/*+*.patch)
[ ${#patches[@]} -gt 0 ] || die "no patches/<crate>+<version>.patch"

for patch_file in "${patches[@]}"; do
  name="$(basename "$patch_file" .patch)"
  crate="${name%+*}"
  version="${name#*+}"
  dest="$dest_parent/$crate-$version"
  stamp="$dest/.logquant-patch.sha256"
  want="$(sha256sum "$patch_file" | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    continue
  fi

  # cargo downloads the .crate files and checks them against the registry index's checksums.
  if ! $fetched; then
    cargo fetch --quiet --manifest-path "$root/patches/pristine/Cargo.toml" \
      || die "cargo could not fetch the pristine crates from the package registry"
    fetched=true
  fi
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
  rm -rf "$tmp"
  trap - EXIT
  echo "prepare-patched-crates: applied $(basename "$patch_file") to $dest"
done
