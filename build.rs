//! Build script: the CUDA kernels of the `cuda` feature (docs/cuda.md).
//!
//! With the feature on, it compiles `kernels/mot.cu` to PTX with nvcc into `OUT_DIR/mot.ptx`,
//! which `src/ops/mot_cuda.rs` embeds and the CUDA driver JIT-compiles for the GPU at first use.
//! It then assembles the kernels with ptxas for sm_80 (A100) and sm_90 (H100), so that a kernel
//! that does not build fails here, on any machine with the toolkit, rather than at its first
//! launch on a GPU. Without the feature it does nothing: no CUDA toolkit is needed.
//!
//! Environment, read the way candle's own kernels read it so both target the same GPU:
//! `CUDA_COMPUTE_CAP` (e.g. `80`, `8.6`, `90`) is the oldest GPU the PTX must run on; unset, the
//! machine's GPUs as nvidia-smi reports them, or 8.0 without one. nvcc is `NVCC`, else the first
//! on `PATH`, in `CUDA_HOME`/`CUDA_PATH` or in `/usr/local/cuda`. `NVCC_CCBIN` picks nvcc's host
//! compiler. `MOTRAIN_PTXAS_VERBOSE=1` prints ptxas's registers and shared memory per kernel as
//! build warnings (they always go to `OUT_DIR/ptxas-sm_XX.txt`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &str = "kernels/mot.cu";
/// PTX for compute capability 8.0 runs on every GPU from the A100 on.
const DEFAULT_COMPUTE_CAP: u32 = 80;
/// The GPUs every kernel must assemble for.
const CHECK_ARCHS: [u32; 2] = [80, 90];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(e) = build_cuda() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn build_cuda() -> Result<(), String> {
    println!("cargo:rerun-if-changed={KERNELS}");
    for var in [
        "CUDA_COMPUTE_CAP",
        "NVCC",
        "NVCC_CCBIN",
        "CUDA_HOME",
        "CUDA_PATH",
        "MOTRAIN_PTXAS_VERBOSE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let cap = compute_cap()?;
    let nvcc = find_nvcc()?;
    // ptxas must come from the same toolkit: an older one rejects a newer PTX ISA version.
    let ptxas = Some(nvcc.with_file_name("ptxas"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "ptxas".into());

    let ptx = out_dir.join("mot.ptx");
    compile_ptx(&nvcc, cap, &ptx)?;

    let verbose = env::var("MOTRAIN_PTXAS_VERBOSE").is_ok_and(|v| !v.is_empty() && v != "0");
    for arch in CHECK_ARCHS {
        // ptxas cannot assemble PTX written for a newer GPU than its target, so when the embedded
        // PTX targets a newer GPU than `arch` (CUDA_COMPUTE_CAP=90 and the sm_80 check), the
        // check compiles the same source for `arch` instead.
        let checked = if cap <= arch {
            ptx.clone()
        } else {
            let p = out_dir.join(format!("mot-compute_{arch}.ptx"));
            compile_ptx(&nvcc, arch, &p)?;
            p
        };
        let report =
            assemble(&ptxas, arch, &checked, &out_dir.join(format!("mot-sm_{arch}.cubin")))?;
        // Kept for anyone who wants the numbers without rebuilding.
        let _ = std::fs::write(out_dir.join(format!("ptxas-sm_{arch}.txt")), &report);
        for line in summarize(&report) {
            if verbose || line.contains("SPILLS") {
                println!("cargo:warning=sm_{arch} {line}");
            }
        }
    }
    Ok(())
}

/// The compute capability the PTX targets, as a number like 80 or 90.
///
/// `CUDA_COMPUTE_CAP` accepts `80`, `8.0`, `sm_80`, `compute_80` and
/// arch-specific forms like `90a`; the suffix is dropped because these kernels use nothing
/// arch-specific, and PTX without it also JIT-compiles on newer GPUs.
fn compute_cap() -> Result<u32, String> {
    match env::var("CUDA_COMPUTE_CAP") {
        Ok(raw) => parse_compute_cap(&raw),
        Err(_) => Ok(gpu_compute_cap().unwrap_or(DEFAULT_COMPUTE_CAP)),
    }
}

/// The lowest compute capability among this machine's GPUs, if nvidia-smi can tell.
fn gpu_compute_cap() -> Option<u32> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| parse_compute_cap(l).ok()).min()
}

fn parse_compute_cap(raw: &str) -> Result<u32, String> {
    let s = raw.trim().to_ascii_lowercase();
    let s = s.strip_prefix("sm_").or_else(|| s.strip_prefix("compute_")).unwrap_or(&s);
    let digits: String = s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).replace('.', "");
    match digits.parse::<u32>() {
        Ok(n) if n < 20 => Ok(n * 10), // "8" means 8.0
        Ok(n) => Ok(n),
        Err(_) => {
            Err(format!("CUDA_COMPUTE_CAP={raw:?} is not a compute capability like 80, 8.6 or 90"))
        }
    }
}

fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from).filter(|p| p.is_file()) {
        return Ok(p);
    }
    let on_path =
        env::var_os("PATH").into_iter().flat_map(|p| env::split_paths(&p).collect::<Vec<_>>());
    let homes = ["CUDA_HOME", "CUDA_PATH"]
        .into_iter()
        .filter_map(env::var_os)
        .map(|h| Path::new(&h).join("bin"));
    on_path
        .chain(homes)
        .chain(std::iter::once(PathBuf::from("/usr/local/cuda/bin")))
        .map(|dir| dir.join("nvcc"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "the `cuda` feature needs nvcc (the CUDA toolkit): put it on PATH or set CUDA_HOME. \
             Without a GPU, .ci/cuda-toolchain.sh installs one for build checks (docs/cuda.md)."
                .to_string()
        })
}

fn compile_ptx(nvcc: &Path, cap: u32, out: &Path) -> Result<(), String> {
    let mut cmd = Command::new(nvcc);
    cmd.args(["--ptx", "-O3", "-std=c++17"]).arg(format!("-arch=compute_{cap}"));
    if let Some(ccbin) = env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    // Build scripts run in the package root, but say so rather than rely on it.
    let src = Path::new(&env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default()).join(KERNELS);
    cmd.arg("-o").arg(out).arg(src);
    run(&mut cmd).map(drop)
}

/// Assembles `ptx` for `sm_{arch}`; returns ptxas's `-v` report (it writes it to stderr).
fn assemble(ptxas: &Path, arch: u32, ptx: &Path, cubin: &Path) -> Result<String, String> {
    let mut cmd = Command::new(ptxas);
    cmd.arg(format!("-arch=sm_{arch}")).arg("-v").arg(ptx).arg("-o").arg(cubin);
    run(&mut cmd)
}

/// Runs a tool; on failure the error carries the command line and what it printed, less
/// ptxas's per-kernel statistics, which would bury the error.
fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("cannot run {shown}: {e}"))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        return Ok(text);
    }
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("ptxas info") && !l.contains("bytes stack frame"))
        .collect();
    Err(format!("{shown} failed ({}):\n{}", out.status, errors.join("\n")))
}

/// One line per kernel from a ptxas `-v` report: "mot_merge_f32: 40 registers, 1024 bytes smem",
/// flagged with SPILLS when registers spill to local memory.
fn summarize(report: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut kernel = "";
    let mut spills = false;
    for l in report.lines() {
        if let Some(rest) = l.split("Compiling entry function '").nth(1) {
            kernel = rest.split('\'').next().unwrap_or("");
            spills = false;
        } else if l.contains("bytes spill stores") {
            spills = !l.contains(", 0 bytes spill stores, 0 bytes spill loads");
        } else if let Some(rest) = l.split("Used ").nth(1) {
            let regs = rest.split(' ').next().unwrap_or("?");
            let smem = l.split(", ").find(|p| p.ends_with("bytes smem")).unwrap_or("0 bytes smem");
            let flag = if spills { ", SPILLS" } else { "" };
            lines.push(format!("{kernel}: {regs} registers, {smem}{flag}"));
        }
    }
    lines
}
