#!/usr/bin/env bash
# The ring collective bug of mistralrs-quant 0.8.1, reproduced and fixed (make test-tp runs it).
# The fix is patches/mistralrs-quant+0.8.1/0001-ring-collectives-wire-size-views-and-sums.patch.
# Builds patches/ring-collective-check twice (into target/ring, sharing its dependencies):
# against the pristine published crate, where the check must FAIL (the all-reduce and
# all-gather size their wire buffers as len² bytes), and against the patched copy
# (target/patched/mistralrs-quant-0.8.1), where it must pass. Exits 0 only when both happen.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target/ring}"
work="$root/target/ring-collective-check"
"$root/scripts/prepare-patched-crates.sh"

# A scratch copy of the package, pinned to the project's own lock file (cargo prunes it).
rm -rf "$work"
mkdir -p "$work"
cp -r "$root/patches/ring-collective-check/Cargo.toml" "$root/patches/ring-collective-check/src" "$work/"
cp "$root/Cargo.lock" "$work/"

for variant in pristine patched; do
  extra=()
  if [ "$variant" = patched ]; then
    extra=(--config "patch.crates-io.mistralrs-quant.path=\"$root/target/patched/mistralrs-quant-0.8.1\"")
  fi
  echo "ring-collective-check: building against the $variant mistralrs-quant 0.8.1"
  (cd "$root" && CARGO_TARGET_DIR="$target" cargo build --release --quiet \
    --manifest-path "$work/Cargo.toml" "${extra[@]}")
  cp "$target/release/ring-collective-check" "$work/$variant"
done

echo "ring-collective-check: pristine crate (expected to fail with the len² send):"
if "$work/pristine" 2> "$work/pristine.err"; then
  echo "ring-collective-check: the pristine crate passed: the bug this patch fixes is gone?" >&2
  exit 1
fi
# The bug's own signature (the send reads past the tensor: EFAULT), not any failure (a port
# taken by another program, a timeout).
grep -m1 -E 'write error: .*(Bad address|code: 14)' "$work/pristine.err" \
  || { cat "$work/pristine.err" >&2; echo "ring-collective-check: the pristine crate failed, but not with the buffer-size bug" >&2; exit 1; }
echo "ring-collective-check: patched crate (expected to pass):"
"$work/patched"
echo "ring-collective-check: the bug reproduces on the pristine crate and the patch fixes it"
