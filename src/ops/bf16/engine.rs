//! Which engine runs bf16 products: what the CPU has (AMX tiles, AVX512_BF16's dot product),
//! what `MOTRAIN_BF16` asks for, and whether `run.dtype = "bf16"` has them on.

use std::sync::OnceLock;

/// Whether this CPU and kernel run AMX bf16 tiles (checked once).
pub fn tiles_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

/// Whether this CPU has AVX512_BF16's dot product, with the AVX-512 the packing needs.
pub fn dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// What runs bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// AMX tiles.
    Tiles,
    /// AVX512_BF16's `vdpbf16ps` on AVX-512 registers.
    Dot,
}

impl Engine {
    /// Every engine, fastest first: the one list the choice and its messages go by.
    pub const ALL: [Engine; 2] = [Engine::Tiles, Engine::Dot];

    /// As `MOTRAIN_BF16` names it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Tiles => "amx",
            Engine::Dot => "avx512bf16",
        }
    }

    /// As the first line of a run says it: the instruction set's own name.
    pub fn label(self) -> &'static str {
        match self {
            Engine::Tiles => "AMX",
            Engine::Dot => "AVX512_BF16",
        }
    }

    fn supported(self) -> bool {
        match self {
            Engine::Tiles => tiles_available(),
            Engine::Dot => dot_available(),
        }
    }
}

/// The environment variable that forces an engine: `amx`, `avx512bf16` or `auto`.
pub const ENV: &str = "MOTRAIN_BF16";

/// The engine `MOTRAIN_BF16` asks for (the fastest this CPU has when unset or `auto`: the
/// tiles, then the dot product), None where the CPU has neither; or why it cannot be had.
fn from_env() -> Result<Option<Engine>, String> {
    let expected = || Engine::ALL.map(Engine::name).join(", ");
    let want = match std::env::var(ENV) {
        Ok(want) => want,
        Err(std::env::VarError::NotPresent) => String::new(),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(format!("{ENV} is not text (expected auto, {})", expected()))
        }
    };
    let fastest = engines().first().copied();
    match want.trim() {
        "" | "auto" => Ok(fastest),
        s => match Engine::ALL.into_iter().find(|e| e.name() == s) {
            Some(e) if e.supported() => Ok(Some(e)),
            Some(e) => Err(format!(
                "{ENV}={s}: this CPU has no {} ({}); unset {ENV} to use the fastest it has",
                e.name(),
                match fastest {
                    Some(f) => format!("it has {}", f.name()),
                    None => "nor any bf16 dot product".into(),
                }
            )),
            None => Err(format!("{ENV}={s}: unknown bf16 engine (expected auto, {})", expected())),
        },
    }
}

static CHOSEN: OnceLock<Option<Engine>> = OnceLock::new();

/// Chooses the engine for this process from `MOTRAIN_BF16` and the CPU. Commands call it
/// first, so that a bad `MOTRAIN_BF16` is an error before any work is done.
pub fn select() -> Result<Option<Engine>, String> {
    let e = from_env()?;
    Ok(*CHOSEN.get_or_init(|| e))
}

thread_local! {
    /// An engine forced on this thread by [`with_engine`] (tests compare engines in one process).
    static FORCED: std::cell::Cell<Option<Engine>> = const { std::cell::Cell::new(None) };
}

/// The engine bf16 products run on, None if they cannot run: a SIMD path below AVX-512
/// (`MOTRAIN_SIMD=avx2` or `portable`) stands for a CPU without either engine.
pub fn engine() -> Option<Engine> {
    if crate::ops::simd::level() != crate::ops::simd::Level::Avx512 {
        return None;
    }
    FORCED.get().or_else(|| *CHOSEN.get_or_init(|| from_env().unwrap_or(None)))
}

/// The engines this CPU has, fastest first.
pub fn engines() -> Vec<Engine> {
    Engine::ALL.into_iter().filter(|e| e.supported()).collect()
}

/// Runs `f` with bf16 products on `engine`, in a pool as wide as the current one whose every
/// thread is set to it. For tests and benchmarks that compare engines; panics if the CPU lacks
/// `engine`.
pub fn with_engine<R: Send>(engine: Engine, f: impl FnOnce() -> R + Send) -> R {
    assert!(engine.supported(), "this CPU has no {}", engine.name());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .start_handler(move |_| FORCED.set(Some(engine)))
        .build()
        .expect("a rayon pool");
    pool.install(f)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    // The packing is AVX-512 with AVX512_BF16's conversion (every CPU with the tiles has
    // both, unless a hypervisor hides them).
    if !(amx_bf16 && amx_tile && osxsave && dot_available()) {
        return false;
    }
    // XCR0 bits 17 and 18: the OS saves tile configuration and tile data.
    let xcr0: u64;
    // SAFETY: XGETBV with ECX = 0 is valid when OSXSAVE is set (checked above).
    unsafe {
        let (lo, hi): (u32, u32);
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
        xcr0 = (hi as u64) << 32 | lo as u64;
    }
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    // Linux hands out the tile data state on request: ARCH_REQ_XCOMP_PERM for XTILEDATA (18).
    // SAFETY: a plain syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023, 18) == 0 }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether bf16 matmuls may run: an [`engine`] is there for them.
pub fn usable() -> bool {
    engine().is_some()
}

/// Whether matmuls of f32 tensors run in bf16 from now on (`run.dtype = "bf16"` on the CPU),
/// as PyTorch's `set_float32_matmul_precision("medium")` lets them; on needs [`usable`].
pub fn set_enabled(on: bool) {
    ENABLED.store(on && usable(), std::sync::atomic::Ordering::Relaxed)
}

/// Whether f32 matmuls run in bf16.
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}
