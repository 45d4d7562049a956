#!/usr/bin/env bash
# For every patch series patches/<crate>+<version>/: fetch the pristine published crate and
# apply the series' *.patch files, in name order (0001-..., 0002-...), into
# target/patched/<crate>-<version>, the path that Cargo.toml's [patch.crates-io] names.
# Idempotent: does nothing for a crate whose patched copy matches its series (the sha256 of the
# series files concatenated in order is stamped in the copy). Stops with the patch file and its
# failing hunks named when a patch no longer applies.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_parent="$root/target/patched"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
fetched=false

die() { echo "prepare-patched-crates: $*" >&2; exit 1; }

shopt -s nullglob
series_dirs=("$root"/patches/*+*/)
[ ${#series_dirs[@]} -gt 0 ] || die "no patches/<crate>+<version>/ patch series"

for series_dir in "${series_dirs[@]}"; do
  series_dir="${series_dir%/}"
  name="$(basename "$series_dir")"
  crate="${name%+*}"
  version="${name#*+}"
  # In name order, bytewise (LC_ALL=C): the numbered prefixes decide the order.
  patch_files=()
  while IFS= read -r f; do patch_files+=("$f"); done \
    < <(LC_ALL=C find "$series_dir" -maxdepth 1 -type f -name '*.patch' | LC_ALL=C sort)
  [ ${#patch_files[@]} -gt 0 ] || die "$series_dir has no *.patch files"
  dest="$dest_parent/$crate-$version"
  stamp="$dest/.logquant-patch.sha256"
  want="$(cat "${patch_files[@]}" | sha256sum | cut -d' ' -f1)"
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

  # Each patch applies on top of the ones before it: dry-run it there, then apply it.
  for patch_file in "${patch_files[@]}"; do
    rel="patches/$name/$(basename "$patch_file")"
    if ! out="$(patch -p1 --batch --forward --dry-run -d "$tmp/$crate-$version" -i "$patch_file" 2>&1)"; then
      # Each failing hunk with its file ("checking file F" / "patching file F" precede them).
      echo "$out" | awk '/^(checking|patching) file /{f=$3} /FAILED|can.t find file|malformed|Reversed|garbage/{print (f ? f ": " : "") $0; n++} END{exit !n}' >&2 \
        || echo "$out" >&2
      die "$rel does not apply to pristine $crate $version plus the patches before it (failing hunks above)"
    fi
    patch -p1 --batch --forward --silent -d "$tmp/$crate-$version" -i "$patch_file"
  done
  echo "$want" > "$tmp/$crate-$version/.logquant-patch.sha256"

  rm -rf "$dest"
  mv "$tmp/$crate-$version" "$dest"
  rm -rf "$tmp"
  trap - EXIT
  echo "prepare-patched-crates: applied patches/$name/ (${#patch_files[@]} patches) to $dest"
done
