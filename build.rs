//! Records the git commit the binary is built from (reports carry it), marked `-dirty` when the
//! working tree has uncommitted changes; with the `cuda` feature, compiles `kernels/*.cu` to PTX
//! with nvcc (for `CUDA_COMPUTE_CAP`, default 90: Hopper).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn commit() -> String {
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) if !c.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{c}-dirty") } else { c }
        }
        _ => "unknown".to_string(),
    }
}

/// nvcc: `NVCC`, else `$CUDA_ROOT/bin/nvcc`, else the one on PATH.
fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin/nvcc");
            if p.is_file() {
                return p;
            }
        }
    }
    "nvcc".into()
}

fn compile_kernels() {
    for var in [
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "CUDA_COMPUTE_CAP",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = nvcc();
    for name in ["attention", "activation", "norm", "sampling"] {
        let src = format!("kernels/{name}.cu");
        let ptx = out_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed on {src} ({s}); see the errors above"),
            Err(e) => panic!(
                "cannot run {} for the cuda feature ({e}): install CUDA 13.0's nvcc, e.g. `source ../shared/gpu/cuda-toolchain.sh`",
                nvcc.display()
            ),
        }
    }
}

/// The kernels compiled for the CPU emulator (`simt` feature, see kernels/simt/simt.cpp).
#[cfg(feature = "simt")]
fn compile_simt() {
    println!("cargo:rerun-if-changed=kernels");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .flag_if_supported("-Wno-unused-parameter")
        .files(["simt", "guard", "kernels"].map(|f| format!("kernels/simt/{f}.cpp")))
        .compile("offline_bench_simt");
}

fn main() {
    for path in [".git/HEAD", ".git/index", "src", "models", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rustc-env=OFFLINE_BENCH_COMMIT={}", commit());
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels();
    }
    #[cfg(feature = "simt")]
    compile_simt();
}
