#!/usr/bin/env bash
# `make build-cuda`: a release binary with `--features cuda`, built on a machine without a GPU
# or a system CUDA toolkit. Not one of the README's two commands; CI never builds it (cargo
# unifies features, so a cuda build must keep its own target directory).
#
# 1. Installs the pinned CUDA 13.0 toolkit pieces (nvcc, crt headers, NVVM, runtime, CCCL,
#    cuBLAS, cuRAND, NVRTC) from the Python package index into target/cuda-toolkit, once.
#    13.0 because the GPU machine's driver (580) runs CUDA 13.0: PTX from a newer nvcc would not
#    load there. mistralrs-quant accepts at most 13.2; the CUDA 12 nvcc wheel has no nvcc.
# 2. Makes the wheels look like a toolkit: unversioned `lib*.so` links for the linker and a
#    `libcuda.so` stub (cudarc links the driver API; the real driver is loaded at run time).
# 3. Builds into target/cuda with CUDA_COMPUTE_CAP (default 90: H100/H200) and no flash-attn.
#
# `scripts/build-cuda.sh --test NAME` builds the test binary of tests/NAME.rs instead.
# `scripts/build-cuda.sh --clippy` runs clippy (all targets, warnings as errors) with the feature.
# Environment: CUDA_COMPUTE_CAP (default 90), CUDA_TOOLKIT_DIR (default target/cuda-toolkit),
# CARGO_BUILD_JOBS as usual. The binary: target/cuda/release/mistralrs-logquant.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
toolkit_dir="${CUDA_TOOLKIT_DIR:-$root/target/cuda-toolkit}"
compute_cap="${CUDA_COMPUTE_CAP:-90}"
python="${PYTHON:-python3}"

die() { echo "build-cuda: $*" >&2; exit 1; }

# One CUDA release (13.0 update 2) throughout; cuRAND is versioned on its own (10.4.0 = 13.0).
packages=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
want="$(printf '%s\n' "${packages[@]}" | sha256sum | cut -d' ' -f1)"
stamp="$toolkit_dir/.installed.sha256"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "build-cuda: installing the CUDA 13.0 toolkit wheels into $toolkit_dir (about 1 GB, once)"
  rm -rf "$toolkit_dir"
  mkdir -p "$toolkit_dir"
  # --no-deps: the pins above are the whole set; resolving would pull newer CUDA releases.
  "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$toolkit_dir/site" "${packages[@]}" \
    || die "pip could not install the pinned CUDA wheels (${packages[*]})"
  echo "$want" > "$stamp"
fi

cuda_root="$toolkit_dir/site/nvidia/cu13"
[ -x "$cuda_root/bin/nvcc" ] || die "no nvcc at $cuda_root/bin/nvcc after installing the wheels"

# The wheels ship versioned shared libraries only (libcublas.so.13); `-lcublas` needs the
# unversioned name.
for lib in "$cuda_root"/lib/lib*.so.*; do
  base="$(basename "$lib")"
  plain="${base%%.so.*}.so"
  [ -e "$cuda_root/lib/$plain" ] || ln -s "$base" "$cuda_root/lib/$plain"
done
# libcuda is the driver's and ships with no wheel. cudarc's dynamic-linking feature links
# against it, so the linker needs a library that defines every driver function: a stub with
# one empty function per name declared in cuda.h (after the preprocessor,
# so the versioned names such as cuMemcpyDtoHAsync_v2), under the driver's soname. It is never
# loaded: on a machine with a GPU the binary resolves libcuda.so.1 to the real driver.
stub_dir="$toolkit_dir/stubs"
if [ ! -f "$stub_dir/libcuda.so" ]; then
  mkdir -p "$stub_dir"
  {
    gcc -E -P -I"$cuda_root/include" -x c "$cuda_root/include/cuda.h" \
      | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//'
    # The profiler functions left cuda.h in CUDA 13 (cudarc still binds them); their
    # entry-point typedefs name them.
    grep -ohE 'PFN_cu[A-Za-z]+_v[0-9]+' "$cuda_root/include/cudaProfilerTypedefs.h" \
      | sed -E 's/^PFN_//; s/_v[0-9]+$//'
  } | sort -u | sed 's/.*/void &(void) {}/' > "$stub_dir/libcuda-stub.c"
  [ -s "$stub_dir/libcuda-stub.c" ] || die "found no driver functions in $cuda_root/include/cuda.h"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so" "$stub_dir/libcuda-stub.c" \
    || die "could not build the libcuda link stub with gcc"
fi

"$cuda_root/bin/nvcc" --version | tail -n 2

export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root"
export CUDA_COMPUTE_CAP="$compute_cap"
export PATH="$cuda_root/bin:$PATH"
# The C linker (cc, which rustc calls) searches LIBRARY_PATH; RUSTFLAGS stays unset so that
# .cargo/config.toml's flags still apply.
export LIBRARY_PATH="$cuda_root/lib:$stub_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cuda_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

./scripts/prepare-patched-crates.sh
start=$(date +%s)
if [ "${1:-}" = "--test" ]; then
  # A test binary for scripts/device-check.sh (same features and target dir, so nothing else
  # is rebuilt).
  [ -n "${2:-}" ] || die "--test needs a test name (a file of tests/)"
  cargo test --release --locked --features cuda --target-dir "$root/target/cuda" --no-run --test "$2"
  echo "build-cuda: test $2 built in $(( $(date +%s) - start )) s"
  exit 0
fi
if [ "${1:-}" = "--clippy" ]; then
  # The CUDA-only code (src/kernels/cuda/, tests/cuda_decode.rs) under clippy, warnings as errors.
  cargo clippy --release --locked --features cuda --target-dir "$root/target/cuda" --all-targets \
    -- -D warnings
  echo "build-cuda: clippy clean with --features cuda in $(( $(date +%s) - start )) s"
  exit 0
fi
cargo build --release --locked --features cuda --target-dir "$root/target/cuda" --bin mistralrs-logquant
echo "build-cuda: target/cuda/release/mistralrs-logquant built in $(( $(date +%s) - start )) s" \
  "(CUDA 13.0, compute capability $compute_cap)"
