#!/usr/bin/env bash
# The prepared CUDA check: LogQuant's device path on a real NVIDIA GPU, in one short run.
#
#   scripts/device-check.sh --prepare   here, after `make build-cuda`: bundles the CUDA binary
#                                       and the device-store and cuda-decode test binaries, stripped and
#                                       xz-compressed, into target/device-check/ (what travels)
#   scripts/device-check.sh             on the GPU machine (no Rust toolchain, no network;
#                                       needs python3 with numpy, nvidia-smi, xz): runs
#     1. tests/device_store.rs on CUDA (MISTRALRS_LOGQUANT_TEST_DEVICE=cuda): the device
#        quantizer's bytes and the device path's attention against the CPU host path;
#     1b. tests/cuda_decode.rs: the fused CUDA decode kernel (src/kernels/cuda/) against the
#        host reference attention and the .cu's reference kernels; from here on the fused
#        kernel is on (MISTRALRS_LOGQUANT_CUDA_FUSED=1: opt-in until it has passed on a GPU);
#     2. a random-weight llama shaped like SmolLM2-135M (scripts/random-llama.py; the real
#        model does not fit what travels), then `eval` default cache vs LogQuant in f32 on CUDA
#        and on the CPU of the same machine (the CPU run is the cross-device oracle), and in bf16
#        on CUDA;
#     3. `bench` default cache vs LogQuant at 1k and 8k context, batch 1 and 8, on CUDA;
#   and prints one table. Before them, step 0 needs no Rust at all:
#     0. scripts/cuda-kernel-check.py: compiles src/kernels/cuda/decode_attention.cu (nvcc, else
#        NVRTC through CuPy), checks the fused and reference kernels against numpy attention
#        and times the fused kernel against dense fp16 attention (JSON: cuda-kernel-check.json).
#   scripts/device-check.sh --kernel-only   step 0 alone (no bundle needed).
#   scripts/device-check.sh --skip-kernel   steps 1-3 alone. The device tool allows 10 minutes a
#                                       command and 15 in all: run --kernel-only (timeout 420)
#                                       and --skip-kernel as two calls, the first first.
#   scripts/device-check.sh --cpu-dry-run   here: the same steps with the CUDA bundle on the
#                                       CPU (--cpu, small sizes, the link stub as libcuda), to
#                                       check the script itself before spending GPU time;
#                                       step 0 runs the kernel check's numpy parts (--cpu-check).
#   Results go to $OUT (the device tool's output folder) or
#   target/device-check/out. Each step has its own time limit; the whole run is sized for
#   under 8 minutes on an H200 plus at most 6 for step 0 (timed out at 360 s).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bundle="$root/target/device-check"
die() { echo "device-check: $*" >&2; exit 1; }
python="${PYTHON:-python3}"  # with numpy, for the model writer

if [ "${1:-}" = "--prepare" ]; then
  cuda_release="$root/target/cuda/release"
  [ -x "$cuda_release/mistralrs-logquant" ] || die "no CUDA binary: run make build-cuda first"
  # The test binaries of tests/device_store.rs and tests/cuda_decode.rs, built with the same
  # features and target dir.
  rm -rf "$bundle" && mkdir -p "$bundle"
  pairs=("mistralrs-logquant:$cuda_release/mistralrs-logquant")
  for test_name in device_store cuda_decode; do
    "$root/scripts/build-cuda.sh" --test "$test_name"
    test_bin="$(ls -t "$cuda_release"/deps/"$test_name"-* 2>/dev/null | grep -v '\.d$' | head -n1)"
    [ -n "$test_bin" ] || die "no $test_name test binary under $cuda_release/deps"
    pairs+=("$test_name:$test_bin")
  done
  for pair in "${pairs[@]}"; do
    name="${pair%%:*}"
    strip -o "$bundle/$name" "${pair#*:}"
    xz -T0 -6 "$bundle/$name"
  done
  ls -l "$bundle"
  total=$(du -cb "$bundle"/*.xz | tail -n1 | cut -f1)
  [ "$total" -lt $((60 * 1024 * 1024)) ] \
    || die "the bundle is $((total / 1048576)) MiB; the device tool carries at most 64 MiB"
  echo "device-check: bundle ready; run on the GPU machine with carry [\"target/device-check\"],"
  echo "  as two calls: scripts/device-check.sh --kernel-only, then scripts/device-check.sh --skip-kernel"
  exit 0
fi

dry_run=false
kernel_only=false
[ "${1:-}" = "--cpu-dry-run" ] && dry_run=true
[ "${1:-}" = "--kernel-only" ] && kernel_only=true
skip_kernel=false
[ "${1:-}" = "--skip-kernel" ] && skip_kernel=true
if $dry_run; then
  test_device=cpu
  device_flags=(--cpu)
  half=f16  # candle has no bf16 matmul on the CPU for unquantized weights
  eval_sizes=(--prefill 256 --score 16)
  bench_sizes=(--contexts 256 --batches 1,2 --decode 4)
else
  test_device=cuda
  device_flags=()
  half=bf16
  eval_sizes=(--prefill 1024 --score 256)
  bench_sizes=(--contexts 1024,8000 --batches 1,8 --decode 16)
fi

out="${OUT:-$bundle/out}"
mkdir -p "$out"
log="$out/device-check.log"
: > "$log"
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$log"; }
run() { # run LIMIT_SECONDS CMD...: the command's output to the log and the terminal
  local limit="$1"; shift
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}
failed=()

# Step 0 first: it needs no bundle, so a GPU session without the Rust binaries still gets it.
if $skip_kernel; then
  step "0. CUDA kernel check skipped (--skip-kernel)"
elif $dry_run; then
  step "0. CUDA kernel check, numpy parts (--cpu-check)"
  run 120 "$python" "$root/scripts/cuda-kernel-check.py" --cpu-check --out "$out/cuda-kernel-check.json" \
    || failed+=("cuda kernel check (cpu)")
else
  step "0. CUDA kernel check: compile, correctness, timing vs dense fp16"
  run 360 "$python" "$root/scripts/cuda-kernel-check.py" --out "$out/cuda-kernel-check.json" \
    || failed+=("cuda kernel check")
fi
if $kernel_only; then
  [ ${#failed[@]} -eq 0 ] || die "failed: ${failed[*]} (log: $log)"
  echo "device-check: kernel check passed (log: $log)"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for name in mistralrs-logquant device_store cuda_decode; do
  [ -f "$bundle/$name.xz" ] || die "missing $bundle/$name.xz: run scripts/device-check.sh --prepare where cargo is"
  xz -dc "$bundle/$name.xz" > "$work/$name" && chmod +x "$work/$name"
done
bin="$work/mistralrs-logquant"

# The CUDA 13 libraries the binaries link (cudart, cuBLAS, cuBLASLt, cuRAND; libcuda is the
# driver's): from the machine's toolkit, else from the Python CUDA wheels (PyTorch's).
cuda_lib_dirs() {
  ls -d /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
    2>/dev/null || true
  python3 - <<'PY' 2>/dev/null || true
import glob, site
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for d in sorted(glob.glob(base + "/nvidia/**/lib", recursive=True)):
        print(d)
PY
}
if $dry_run; then
  # This machine has the toolkit wheels but no driver: the link stub stands in for libcuda.
  ln -s "$root/target/cuda-toolkit/stubs/libcuda.so" "$work/libcuda.so.1"
  LD_LIBRARY_PATH="$root/target/cuda-toolkit/site/nvidia/cu13/lib:$work"
fi
for dir in $(cuda_lib_dirs); do
  LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$dir"
done
export LD_LIBRARY_PATH
for name in mistralrs-logquant device_store cuda_decode; do
  missing="$(ldd "$work/$name" | grep 'not found' || true)"
  [ -z "$missing" ] || die "$name needs libraries this machine lacks: $(echo $missing)"
done
step "machine"
if $dry_run; then
  echo "CPU dry run: $(nproc) cores" | tee -a "$log"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log" \
    || die "nvidia-smi failed: no NVIDIA GPU here"
fi

step "1. device-store tests on $test_device"
run 120 env MISTRALRS_LOGQUANT_TEST_DEVICE="$test_device" "$work/device_store" --test-threads=1 \
  || failed+=("device_store tests")

step "1b. fused CUDA decode attention (tests/cuda_decode.rs; skips itself without a GPU)"
require_cuda=()
$dry_run || require_cuda=(MISTRALRS_LOGQUANT_REQUIRE_CUDA=1)  # a skip is a failure on a GPU
run 180 env "${require_cuda[@]}" "$work/cuda_decode" --test-threads=1 --nocapture \
  || failed+=("cuda_decode tests")

# The fused CUDA decode kernel is opt-in until it has passed here: on for the steps below.
export MISTRALRS_LOGQUANT_CUDA_FUSED=1

step "2. random-weight SmolLM2-shaped llama"
model="$work/model"
run 120 "$python" "$root/scripts/random-llama.py" "$model" --shape smollm2-135m || die "model writer failed"
common=(--model-id "$model" --text "$model/text.txt" --start 0 --configs default,logquant "${eval_sizes[@]}")
step "2a. eval on CUDA, f32"
run 150 "$bin" eval "${common[@]}" "${device_flags[@]}" --dtype f32 --json "$out/eval-cuda-f32.json" || failed+=("eval cuda f32")
step "2b. eval on the CPU, f32 (the oracle for 2a)"
run 240 "$bin" eval "${common[@]}" --dtype f32 --cpu --json "$out/eval-cpu-f32.json" || failed+=("eval cpu f32")
step "2c. eval on CUDA, $half"
run 150 "$bin" eval "${common[@]}" "${device_flags[@]}" --dtype "$half" --json "$out/eval-cuda-half.json" \
  || failed+=("eval cuda $half")

step "3. bench on CUDA, $half"
run 240 "$bin" bench --model-id "$model" --configs default,logquant "${bench_sizes[@]}" \
  "${device_flags[@]}" --dtype "$half" --json "$out/bench-cuda-half.json" || failed+=("bench")

step "summary"
if ! python3 - "$out" "$half" <<'PY' | tee -a "$log"
import json, os, sys
out, half = sys.argv[1], sys.argv[2]
def rows(name):
    path = os.path.join(out, name)
    return json.load(open(path))["rows"] if os.path.exists(path) else []
print("| eval run | config | perplexity | KL vs default | top-1 |")
print("|---|---|---|---|---|")
for name, label in [("eval-cuda-f32.json", "CUDA f32"), ("eval-cpu-f32.json", "CPU f32"),
                    ("eval-cuda-half.json", f"CUDA {half}")]:
    for r in rows(name):
        print(f"| {label} | {r.get('config')} | {r.get('perplexity', float('nan')):.4f} "
              f"| {r.get('kl_vs_default', float('nan')):.5f} | {r.get('top1_agreement', float('nan')):.3f} |")
# The cross-device oracle: the same f32 model and cache on the CPU. Mean log-likelihoods may
# differ by summation order only; 1e-3 nats per token is far above that and far below a bug.
import math
cuda, cpu = rows("eval-cuda-f32.json"), rows("eval-cpu-f32.json")
mismatch = len(cuda) != len(cpu) or not cuda
for a, b in zip(cuda, cpu):
    nats = abs(math.log(a["perplexity"]) - math.log(b["perplexity"]))
    mismatch |= nats > 1e-3
    print(f"CUDA vs CPU, f32, {a['config']}: mean log-likelihood differs by {nats:.2e} nats/token")
print()
print(f"bench, {half}:")
print("| config | context | batch | prefill tok/s | decode tok/s | vs default | cache bytes | vs default |")
print("|---|---|---|---|---|---|---|---|")
bench = rows("bench-cuda-half.json")
base = {(r["context"], r["batch"]): r for r in bench if r["config"] == "default"}
for r in bench:
    d = base.get((r["context"], r["batch"]))
    speed = r["decode_tokens_per_s"] / d["decode_tokens_per_s"] if d else float("nan")
    size = d["cache_bytes"] / r["cache_bytes"] if d and r["cache_bytes"] else float("nan")
    print(f"| {r['config']} | {r['context']} | {r['batch']} | {r['prefill_tokens_per_s']:.1f} "
          f"| {r['decode_tokens_per_s']:.2f} | {speed:.2f}x | {r['cache_bytes']} | {size:.2f}x smaller |")
sys.exit(3 if mismatch else 0)
PY
then
  failed+=("CUDA and CPU evals disagree")
fi
if [ ${#failed[@]} -gt 0 ]; then
  die "failed: ${failed[*]} (log: $log)"
fi
echo "device-check: all steps passed (log: $log)"
