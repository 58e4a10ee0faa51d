//! What the kernel timing examples share: a median of timed runs and positional arguments.
// Each example uses the part it needs.
#![allow(dead_code)]

/// Seconds `f` takes: the median of `runs` timed calls after `warmups` untimed ones.
pub fn median_time(warmups: usize, runs: usize, f: &dyn Fn()) -> f64 {
    for _ in 0..warmups {
        f();
    }
    let mut ts: Vec<f64> = (0..runs.max(1))
        .map(|_| {
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
