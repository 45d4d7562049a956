#!/usr/bin/env bash
# Proves that each patch series patches/<crate>+<version>/ makes the same tree as the single
# patch file patches/<crate>+<version>.patch it replaced (issue #30), from the repository alone:
# the single patch is read from git history (`git show REV:patches/<crate>+<version>.patch`),
# applied to one pristine copy of the crate, the series to another (in name order, each patch
# exactly: no fuzz), and the two trees are compared with `diff -r`. The series is the one of
# the commit that deleted the single patch (the split itself: patches added since, such as
# new fixes, are not in the single patch), or the working tree's while the single patch
# still exists. That today's whole series applies is what every `make` checks
# (scripts/prepare-patched-crates.sh).
#
# Usage: scripts/check-patch-series.sh [REV]
#   REV  the commit to take the single patches from; default, for each crate, the last commit
#        that added or changed its single patch file (so the file is there)
# Exits 0, with one line per crate, when every pair of trees is byte-identical.
set -euo pipefail
export LC_ALL=C

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "check-patch-series: $*" >&2; exit 1; }
rev_arg="${1:-}"

shopt -s nullglob
series_dirs=("$root"/patches/*+*/)
[ ${#series_dirs[@]} -gt 0 ] || die "no patches/<crate>+<version>/ patch series"

cargo fetch --quiet --manifest-path "$root/patches/pristine/Cargo.toml" \
  || die "cargo could not fetch the pristine crates"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for series_dir in "${series_dirs[@]}"; do
  series_dir="${series_dir%/}"
  name="$(basename "$series_dir")"
  crate="${name%+*}"
  version="${name#*+}"
  single="patches/$name.patch"

  rev="$rev_arg"
  if [ -z "$rev" ]; then
    rev="$(git -C "$root" log -1 --format=%H --diff-filter=AM -- "$single")"
    [ -n "$rev" ] || die "no commit in git history has $single"
  fi
  git -C "$root" show "$rev:$single" > "$tmp/$name.single.patch" 2>/dev/null \
    || die "$single is not in commit $rev"

  archive="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$version.crate" 2>/dev/null | head -n1)"
  [ -n "$archive" ] || die "$crate-$version.crate not found in cargo's registry cache"
  for side in single series; do
    mkdir -p "$tmp/$side.$name"
    tar -xzf "$archive" -C "$tmp/$side.$name"
  done

  # The single patch, as scripts/prepare-patched-crates.sh applied it.
  patch -p1 --batch --forward --silent -d "$tmp/single.$name/$crate-$version" \
    -i "$tmp/$name.single.patch" || die "$single (at $rev) does not apply to pristine $crate"

  # The series that replaced the single patch: as of the commit that deleted it, if one did.
  deleted="$(git -C "$root" log -1 --format=%H --diff-filter=D -- "$single")"
  mkdir -p "$tmp/series-files.$name"
  if [ -n "$deleted" ]; then
    while IFS= read -r path; do
      git -C "$root" show "$deleted:$path" > "$tmp/series-files.$name/$(basename "$path")"
    done < <(git -C "$root" ls-tree --name-only "$deleted" "patches/$name/" | grep '\.patch$')
    series_from="commit ${deleted:0:12}"
  else
    cp "$series_dir"/*.patch "$tmp/series-files.$name/"
    series_from="the working tree"
  fi

  count=0
  while IFS= read -r f; do
    out="$(patch -p1 --batch --forward --fuzz=0 -d "$tmp/series.$name/$crate-$version" -i "$f" 2>&1)" \
      || { echo "$out" >&2; die "patches/$name/$(basename "$f") does not apply exactly after the patches before it"; }
    if grep -qE 'offset|fuzz' <<< "$out"; then
      echo "check-patch-series: note: patches/$name/$(basename "$f"): $(grep -E 'offset|fuzz' <<< "$out" | head -n1)" >&2
    fi
    count=$((count + 1))
  done < <(find "$tmp/series-files.$name" -maxdepth 1 -type f -name '*.patch' | sort)
  [ "$count" -gt 0 ] || die "patches/$name/ has no *.patch files"

  if ! diff -r --exclude=.logquant-patch.sha256 \
      "$tmp/single.$name/$crate-$version" "$tmp/series.$name/$crate-$version" > "$tmp/$name.diff"; then
    head -n 60 "$tmp/$name.diff" >&2
    die "$crate $version: the series patches/$name/ and $single (at ${rev:0:12}) make different trees (above)"
  fi
  echo "check-patch-series: $crate $version: patches/$name/ of $series_from ($count patches) == $single at ${rev:0:12}: identical trees"
done
