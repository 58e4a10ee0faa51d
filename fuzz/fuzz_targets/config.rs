//! The config parser on arbitrary UTF-8: `Config::from_toml_str`, `Config::load` (a file plus
//! `--set` overrides) and `apply_override` on a parsed table. The input is the TOML text, then
//! optionally NUL-separated `KEY=VALUE` overrides. A config that loads must also survive the
//! round trip through the resolved `config.toml` a run writes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use motrain::config::{apply_override, Config};
use std::path::PathBuf;
use std::sync::OnceLock;

const MIN: &str = "[run]\nname='t'\n[data]\ntrain='x/*.bin'\n[model]\nvocab_size=100\n";

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("motrain-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn round_trip(c: &Config) {
    let text = c.to_toml();
    if let Err(e) = Config::from_toml_str(&text, "round trip") {
        panic!("a loaded config does not re-load from its resolved TOML: {e}\n{text}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let mut parts = input.split('\0');
    let text = parts.next().unwrap_or_default();
    let overrides: Vec<String> = parts.map(str::to_string).collect();

    if let Ok(c) = Config::from_toml_str(text, "fuzz") {
        round_trip(&c);
    }

    let path = scratch().join("config.toml");
    std::fs::write(&path, text).unwrap();
    if let Ok(c) = Config::load(&path, &overrides) {
        round_trip(&c);
    }

    let mut table: toml::Table = text.parse().unwrap_or_else(|_| MIN.parse().unwrap());
    for o in &overrides {
        let _ = apply_override(&mut table, o);
    }
    if let Ok(c) = Config::from_table(table, "fuzz") {
        round_trip(&c);
    }
});
