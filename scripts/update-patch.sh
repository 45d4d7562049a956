#!/usr/bin/env bash
# For developers of the patches: after editing target/patched/<crate>-<version> (made by
# scripts/prepare-patched-crates.sh from the whole series), write those edits into ONE patch of
# the series patches/<crate>+<version>/, or into a new patch.
#
# Usage: scripts/update-patch.sh CRATE PATCH
#   CRATE  mistralrs-core or mistralrs-quant
#   PATCH  an existing patch of the series, by its number (0009) or file name, or a new patch
#          as NNNN-short-name (it takes its place in the series by name; give it a header)
#
# The patch is regenerated as the difference between
#   base: the pristine crate plus the series' patches that sort before PATCH, and
#   top:  the edited copy with the patches that sort after PATCH reverse-applied (exactly, no
#         fuzz; if one no longer reverses, the edit touches its lines: make it in that patch).
# The patch keeps its header (the text before its first `diff`). The script then checks that
# pristine plus the whole new series reproduces the edited copy byte for byte, and only then
# replaces the patch file and re-stamps the copy (so prepare-patched-crates.sh keeps it).
set -euo pipefail
export LC_ALL=C # name order is byte order

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "update-patch: $*" >&2; exit 1; }
usage() {
  sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[ $# -eq 2 ] || usage
crate="${1%%+*}"
want_patch="$2"

shopt -s nullglob
dirs=("$root"/patches/"$crate"+*/)
[ ${#dirs[@]} -eq 1 ] || die "expected one patches/$crate+<version>/ series, found ${#dirs[@]}"
series_dir="${dirs[0]%/}"
name="$(basename "$series_dir")"
version="${name#*+}"
dest="$root/target/patched/$crate-$version"
[ -d "$dest" ] || die "$dest does not exist; run scripts/prepare-patched-crates.sh, then edit it"

series() { find "$series_dir" -maxdepth 1 -type f -name '*.patch' | sort; }
series_hash() { series | tr '\n' '\0' | xargs -0 cat | sha256sum | cut -d' ' -f1; }

# The copy must have been made from the series as it is now, or the patches would be
# regenerated against other patches than the ones it was built from.
[ "$(cat "$dest/.logquant-patch.sha256" 2>/dev/null)" = "$(series_hash)" ] \
  || die "$dest was not prepared from the current patches/$name/ (its stamp differs): save your edits, run scripts/prepare-patched-crates.sh, and redo them"

# Which patch: an existing one by number or name, or a new NNNN-name.
target=""
while IFS= read -r f; do
  b="$(basename "$f")"
  if [ "$b" = "$want_patch" ] || [ "$b" = "$want_patch.patch" ] || [[ "$b" == "$want_patch"-* ]]; then
    [ -z "$target" ] || die "$want_patch names more than one patch of patches/$name/"
    target="$f"
  fi
done < <(series)
new=false
if [ -z "$target" ]; then
  [[ "$want_patch" =~ ^[0-9]{4}[A-Za-z0-9._-]*-[A-Za-z0-9._-]+$ ]] \
    || die "no patch $want_patch in patches/$name/ (a new patch is named NNNN-short-name)"
  target="$series_dir/${want_patch%.patch}.patch"
  new=true
fi
target_name="$(basename "$target")"

cargo fetch --quiet --manifest-path "$root/patches/pristine/Cargo.toml"
archive="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$version.crate" | head -n1)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
unpack() { mkdir -p "$tmp/unpack" && tar -xzf "$archive" -C "$tmp/unpack" && mv "$tmp/unpack/$crate-$version" "$1"; }
apply() { # apply DIR PATCH [patch options]: exact, or name the patch and its failing hunks
  local dir="$1" file="$2"; shift 2
  local out
  if ! out="$(patch -p1 --batch --fuzz=0 --reject-file=- "$@" -d "$dir" -i "$file" 2>&1)"; then
    # Each failing hunk with its file ("checking file F" / "patching file F" precede them).
    echo "$out" | awk '/^(checking|patching) file /{f=$3} /FAILED|can.t find file|malformed|Reversed|garbage/{print (f ? f ": " : "") $0; n++} END{exit !n}' >&2 \
      || echo "$out" >&2
    return 1
  fi
}

# base: pristine + the patches before the target.
unpack "$tmp/a"
while IFS= read -r f; do
  [[ "$(basename "$f")" < "$target_name" ]] || continue
  apply "$tmp/a" "$f" --forward || die "$(basename "$f") does not apply to pristine $crate $version"
done < <(series)

# top: the edited copy without the patches after the target (last first).
cp -a "$dest" "$tmp/b"
rm -f "$tmp/b/.logquant-patch.sha256"
while IFS= read -r f; do
  [[ "$(basename "$f")" > "$target_name" ]] || continue
  apply "$tmp/b" "$f" --reverse \
    || die "$(basename "$f") (after $target_name) no longer reverses on your edited copy: the edit changes lines that $(basename "$f") changes or is next to; make it in that patch"
done < <(series | sort -r)

# The new patch: the old header (text before the first diff), then the difference.
header="$tmp/header"
if $new; then
  printf '%s\n\n%s\n\n' "TITLE: what this patch changes, in one line" \
    "WHY: an upstream bug, a seam, ...; what shows it (a test, a script)." > "$header"
else
  awk '/^(diff |--- )/ { exit } { print }' "$target" > "$header"
fi
(cd "$tmp" && diff -ruN --exclude=.git --exclude=.logquant-patch.sha256 a b || true) \
  | sed -E 's/^(---|\+\+\+) ([^\t]*)\t.*$/\1 \2/' > "$tmp/body"
[ -s "$tmp/body" ] || die "$target_name would be empty (your edits are not in it, or it has none)"
cat "$header" "$tmp/body" > "$tmp/new.patch"

# The whole new series must reproduce the edited copy.
unpack "$tmp/check"
while IFS= read -r f; do
  [ "$f" = "$target" ] && continue
  printf '%s\n' "$f"
done < <(series) > "$tmp/others"
while IFS= read -r f; do
  src="$f"
  [ "$f" = "$target" ] && src="$tmp/new.patch"
  apply "$tmp/check" "$src" --forward || die "with the new $target_name, $(basename "$f") no longer applies"
done < <({ cat "$tmp/others"; printf '%s\n' "$target"; } | sort)
diff -r --exclude=.logquant-patch.sha256 --exclude=.git "$tmp/check" "$dest" > "$tmp/mismatch" \
  || { head -n 40 "$tmp/mismatch" >&2; die "pristine + the new series does not reproduce $dest (above); nothing written"; }

cp "$tmp/new.patch" "$target"
series_hash > "$dest/.logquant-patch.sha256"
if $new; then
  echo "update-patch: wrote the new patches/$name/$target_name ($(grep -c '^+++ ' "$target") files); edit its header (title, why)"
else
  echo "update-patch: wrote patches/$name/$target_name ($(grep -c '^+++ ' "$target") files)"
fi
