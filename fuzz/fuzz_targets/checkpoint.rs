//! cargo-fuzz target: `load_state` + `load_tensors` + `Params::load` on arbitrary bytes (see
//! `fuzz/harness.rs` for the input layout). RUST_BACKTRACE is set so that an error carrying a
//! candle backtrace (several lines) is caught.
#![no_main]

#[path = "../harness.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A scratch directory of this process for the files the readers take.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("motrain-fuzz-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    static BACKTRACES: std::sync::Once = std::sync::Once::new();
    BACKTRACES.call_once(|| std::env::set_var("RUST_BACKTRACE", "1"));
    let _ = harness::checkpoint(data, scratch());
});
