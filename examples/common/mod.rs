//! What the kernel timing examples share: a median of timed runs and positional arguments.
// Each example uses the part it needs.
#![allow(dead_code)]

/// Seconds `f` takes: the median of `runs` timed calls after `warmups` untimed ones.
pub fn median_time(warmups: usize, runs: usize, f: &dyn Fn()) -> f64 {
    median_after(warmups, runs, f, |_| {})
}

/// [`median_time`] with every call's operands cold: before each call (untimed), a pass that
/// writes and reads 512 MiB evicts them from every cache level, as a training step does
/// between an op's forward and its backward.
pub fn median_time_cold(warmups: usize, runs: usize, f: &dyn Fn()) -> f64 {
    use rayon::prelude::*;
    let mut evict = vec![0u64; 64 << 20];
    median_after(warmups, runs, f, |k| {
        evict.par_chunks_mut(1 << 16).for_each(|c| c.iter_mut().for_each(|v| *v += k));
        std::hint::black_box(evict.par_iter().sum::<u64>());
    })
}

/// The median of `runs` timed calls of `f` after `warmups` untimed ones, `before(k)` run
/// untimed before timed call k.
fn median_after(warmups: usize, runs: usize, f: &dyn Fn(), mut before: impl FnMut(u64)) -> f64 {
    for _ in 0..warmups {
        f();
    }
    let mut ts: Vec<f64> = (0..runs.max(1) as u64)
        .map(|k| {
            before(k);
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[ts.len() / 2]
}

/// Positional argument `i` as a positive integer, `default` when absent; anything else exits
/// with an `error:` line and the usage.
pub fn arg(i: usize, default: usize, usage: &str) -> usize {
    match std::env::args().nth(i) {
        None => default,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("error: argument {i} is {s:?}, expected a positive integer");
                eprintln!("usage: {usage}");
                std::process::exit(2)
            }
        },
    }
}
