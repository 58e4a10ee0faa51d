//! motrain: pretrain dense, Mixture-of-Experts and Mixture-of-Tokens transformers on candle.
//!
//! Read from `main.rs` down: `cli` parses a command and calls one function of the library;
//! `config` turns TOML into a validated `Config`; `data` reads shards into windows; `model`
//! is the transformer of `models.md` over fused `ops`; `train` runs the loop and writes
//! `checkpoint`s and `metrics`; `dist` is the data-parallel world (MPI when launched by
//! mpirun/srun) and `signals` the stop requests the loop polls.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod digest;
pub mod dist;
pub mod eval;
pub mod export;
pub mod generate;
pub mod import;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod plot;
pub mod rng;
pub mod run_dir;
pub mod signals;
pub mod train;
pub mod transition;
pub mod upcycle;

pub mod alloc;
