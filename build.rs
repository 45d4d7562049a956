//! With the `cuda` feature: compiles `src/kernels/cuda/decode_attention.cu` to PTX with nvcc
//! into `OUT_DIR`, where `src/kernels/cuda/mod.rs` embeds it. Without it: nothing.
//!
//! nvcc at build time rather than NVRTC at run time: NVRTC would need the location of
//! `cuda_fp16.h` / `cuda_bf16.h` at run time on the GPU machine, while the `cuda` build needs
//! nvcc anyway (candle and mistral.rs compile their own kernels with it), so a compile error in
//! the `.cu` also shows here, not on first use. The PTX targets the virtual architecture
//! `compute_${CUDA_COMPUTE_CAP}` (default 90, as scripts/build-cuda.sh); the driver JIT-compiles
//! it for the GPU it runs on.

use std::path::PathBuf;
use std::process::Command;

const KERNEL: &str = "src/kernels/cuda/decode_attention.cu";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed={KERNEL}");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out_dir.join("decode_attention.ptx");
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    // CUDA_ROOT/bin/nvcc (scripts/build-cuda.sh exports it), else nvcc on PATH.
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            &format!("-arch=compute_{compute_cap}"),
            "-O3",
            "-std=c++17",
        ])
        .arg(KERNEL)
        .arg("-o")
        .arg(&ptx)
        .status()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("{} failed on {KERNEL} ({status})", nvcc.display());
    }
}
