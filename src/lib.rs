//! motrain: pretrain dense, Mixture-of-Experts and Mixture-of-Tokens transformers on candle.
//!
//! Read from `main.rs` down: `cli` parses a command and calls one function of the library;
//! `config` turns TOML into a validated `Config`; `data` reads shards into windows; `model`
//! is the transformer of `models.md` over fused `ops`; `train` runs the loop and writes
//! `checkpoint`s and `metrics`.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod train;

// Training allocates and frees the same large activations every step; jemalloc keeps those
// pages mapped for reuse, where glibc returns them to the kernel and faults them back in.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Keep freed pages for reuse (a training step frees and reallocates the same sizes) instead of
/// returning them to the kernel, which would fault them back in, zeroed, on the next step.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0\0";
