//! The SIMD path the fused CPU kernels run on, chosen once at run time so that one portable
//! binary uses the full width of whatever x86 CPU it lands on.
//!
//! The kernels are written once, as plain loops that LLVM vectorises (see `vec`). [`run`] calls
//! such a loop through a function compiled for the chosen instruction set: the loop is inlined
//! into it and vectorised for that width. `MOTRAIN_SIMD` forces a lower path (for testing and
//! comparison); forcing one the CPU lacks is an error, never an illegal instruction.

use std::cell::Cell;
use std::sync::OnceLock;

/// The environment variable that forces a path: `portable`, `avx2`, `avx512` or `auto`.
pub const ENV: &str = "MOTRAIN_SIMD";

/// A SIMD path, from the narrowest to the widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// What the target guarantees: SSE2 on x86-64, NEON on aarch64.
    Portable,
    /// x86-64-v3: AVX2, FMA, BMI2 (Intel Haswell, AMD Zen and newer).
    Avx2,
    /// x86-64-v4: AVX-512 F/BW/CD/DQ/VL (Intel Skylake-SP, AMD Zen 4 and newer).
    Avx512,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Portable, Level::Avx2, Level::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable if cfg!(target_arch = "aarch64") => "neon",
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s || (s == "portable" && *l == Level::Portable))
    }

    /// Whether code compiled for the path has fused multiply-add: every x86 path but the
    /// portable one (baseline x86-64 has none, and `f32::mul_add` is a libm call there), and
    /// NEON, which always has it.
    pub fn fma(self) -> bool {
        self != Level::Portable || cfg!(target_arch = "aarch64")
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Level::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                use std::arch::is_x86_feature_detected as has;
                has!("avx2")
                    && has!("fma")
                    && has!("bmi1")
                    && has!("bmi2")
                    && has!("f16c")
                    && has!("lzcnt")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                use std::arch::is_x86_feature_detected as has;
                Level::Avx2.supported()
                    && has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512cd")
                    && has!("avx512dq")
                    && has!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every path this CPU can run, narrowest first.
pub fn available() -> Vec<Level> {
    Level::ALL.into_iter().filter(|l| l.supported()).collect()
}

/// The widest path this CPU can run.
pub fn best() -> Level {
    *available().last().expect("the portable path is always available")
}

/// The path `MOTRAIN_SIMD` asks for (the widest available when unset or `auto`), or why it
/// cannot be had.
fn from_env() -> Result<Level, String> {
    let want = match std::env::var(ENV) {
        Ok(want) => want,
        Err(std::env::VarError::NotPresent) => return Ok(best()),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(format!(
                "{ENV} is not text (expected auto, {})",
                Level::ALL.map(Level::name).join(", ")
            ))
        }
    };
    let names = || Level::ALL.map(Level::name).join(", ");
    match want.trim() {
        "" | "auto" => Ok(best()),
        s => match Level::parse(s) {
            Some(l) if l.supported() => Ok(l),
            Some(l) => Err(format!(
                "{ENV}={s}: this CPU has no {l} (it supports {}); unset {ENV} to use the widest",
                available().iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
            )),
            None => Err(format!("{ENV}={s}: unknown SIMD path (expected auto, {})", names())),
        },
    }
}

static CHOSEN: OnceLock<Level> = OnceLock::new();

thread_local! {
    /// A path forced on this thread by [`with_level`] (tests compare paths in one process).
    static FORCED: Cell<Option<Level>> = const { Cell::new(None) };
}

/// Chooses the path for this process from `MOTRAIN_SIMD` and the CPU. Commands call it first,
/// so that a bad `MOTRAIN_SIMD` is an error before any work is done.
pub fn select() -> Result<Level, String> {
    let l = from_env()?;
    Ok(*CHOSEN.get_or_init(|| l))
}

/// The path kernels run on now.
#[inline]
pub fn level() -> Level {
    // A bad `MOTRAIN_SIMD` reaching here (library use without `select`) gets the portable path:
    // slow but safe on every CPU.
    FORCED.get().unwrap_or_else(|| *CHOSEN.get_or_init(|| from_env().unwrap_or(Level::Portable)))
}

/// What the kernels run on, for the first line of a run and for benchmarks: `simd avx512`, or
/// the GPU backend.
pub fn describe(device: &candle_core::Device) -> String {
    if device.is_cpu() {
        format!("simd {}", level())
    } else if device.is_cuda() {
        "cuda".to_string()
    } else {
        "metal".to_string()
    }
}

/// The CPU's model name (`/proc/cpuinfo`), or the architecture where that cannot be read.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Runs `f` with every kernel on `level`, on a one-thread pool so that rayon's tasks see it too.
/// For tests and benchmarks that compare paths; panics if the CPU lacks `level`.
pub fn with_level<R: Send>(level: Level, f: impl FnOnce() -> R + Send) -> R {
    assert!(level.supported(), "this CPU has no {level}");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a rayon pool");
    pool.install(|| {
        let before = FORCED.replace(Some(level));
        let r = f();
        FORCED.set(before);
        r
    })
}

/// Runs `f`, a kernel's inner loop, compiled for the current path. Call it where the work is
/// (inside each rayon task, around a whole row or block), not around code that spawns tasks,
/// and mark the closure and the functions it calls `#[inline(always)]`: only code inlined into
/// the path's copy of `f` is compiled for that path.
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    match level() {
        // SAFETY: `level()` only returns paths that `Level::supported` found on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512(f) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2(f) },
        _ => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512cd,avx512dq,avx512vl")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,f16c,lzcnt")]
#[inline]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,f16c,lzcnt")]
#[inline]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_best_path_is_supported() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
        }
        assert!(best().supported());
        assert_eq!(available()[0], Level::Portable);
    }

    #[test]
    fn with_level_reaches_rayon_tasks() {
        use rayon::prelude::*;
        for l in available() {
            let seen: Vec<Level> =
                with_level(l, || (0..64).into_par_iter().map(|_| level()).collect());
            assert!(seen.iter().all(|&s| s == l), "{l}: {seen:?}");
        }
    }
}
