//! With the `cuda` feature, compiles the fused SelfExtend attention kernel to PTX with
//! `nvcc` (for compute capability `$CUDA_COMPUTE_CAP`, default 80); without it, nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNEL: &str = "src/attention/cuda/selfextend.cu";

fn main() {
    println!("cargo:rerun-if-changed={KERNEL}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let ptx = out.join("selfextend.ptx");
    let status = Command::new("nvcc")
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
            "-o",
        ])
        .arg(&ptx)
        .arg(KERNEL)
        .status()
        .unwrap_or_else(|e| {
            panic!("the cuda feature needs nvcc on PATH (scripts/build-cuda): {e}")
        });
    assert!(status.success(), "nvcc failed on {KERNEL}");
}
