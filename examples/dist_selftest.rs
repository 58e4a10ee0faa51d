//! Exercises `motrain::dist` on however many ranks it is launched with; tests/mpi.rs runs it
//! under `mpirun -n 2`. Build: `cargo build --release --example dist_selftest --features mpi`.
//!
//! `dist_selftest collectives`: every collective against values each rank can compute alone;
//! exit 0 and one `ok` line per rank, or 1 and an `error:` line naming the rank and collective.
//! `dist_selftest hang`: the last rank stays alive but never joins the second all-reduce (a hung
//! peer); the others' watchdog must end them.
//! `dist_selftest kill9`: the last rank SIGKILLs itself before the second all-reduce (a lost
//! peer).
//! `dist_selftest mismatch`: rank r all-reduces 10 + r values; the arrival check must abort.
//! `dist_selftest bench`: rank 0 prints the time of one 25 MB gradient bucket's all-reduce and
//! of one `all_agree` (latency: arrival check plus a one-integer all-reduce).

use candle_core::{DType, Device, Tensor};
use motrain::dist::{padded_len, Dist};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let dist = match Dist::from_env() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match mode.as_str() {
        "collectives" => collectives(&dist),
        "hang" => lose_last_rank(&dist, || std::thread::sleep(Duration::from_secs(600))),
        "kill9" => lose_last_rank(&dist, || {
            let _ = signal_hook::low_level::raise(libc::SIGKILL);
        }),
        "bench" => bench(&dist),
        "mismatch" => {
            // Ranks disagreeing on a length: the arrival check must stop them before MPI runs.
            let mut v = vec![1f32; 10 + dist.rank()];
            dist.all_reduce_sum_in_place(&mut v);
            Err("an all-reduce of different lengths completed".into())
        }
        _ => Err("usage: dist_selftest collectives|hang|kill9|mismatch|bench".to_string()),
    };
    match result {
        Ok(()) => {
            println!("rank {}/{}: {mode} ok", dist.rank(), dist.size());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: rank {}: {e}", dist.rank());
            // The other ranks may be inside a collective this one will never join.
            dist.abort(1)
        }
    }
}

fn check<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn collectives(d: &Dist) -> Result<(), String> {
    let (r, n) = (d.rank(), d.size());
    if let Some(expected) =
        std::env::var("SELFTEST_EXPECT_SIZE").ok().and_then(|s| s.parse::<usize>().ok())
    {
        check("world size", n, expected)?;
    }
    let tri = (n * (n + 1) / 2) as f32;

    // Rank r contributes (r + 1) * i, so the sum at i is i * n(n+1)/2. Longer than one eager MPI
    // message, so the rendezvous path runs too.
    let len = 300_001;
    let mut v: Vec<f32> = (0..len).map(|i| ((r + 1) * (i % 1000)) as f32).collect();
    d.all_reduce_sum_in_place(&mut v);
    let want: Vec<f32> = (0..len).map(|i| (i % 1000) as f32 * tri).collect();
    check("all_reduce_sum(f32)", v == want, true)?;

    // Values an f32 sum would round: the f64 path must keep them.
    let mut w = vec![1e15 + r as f64, -0.25 * r as f64];
    d.all_reduce_sum_in_place_f64(&mut w);
    check(
        "all_reduce_sum(f64)",
        w,
        vec![1e15 * n as f64 + (n * (n - 1) / 2) as f64, -0.25 * (n * (n - 1) / 2) as f64],
    )?;

    for root in [0, n - 1] {
        let mut b = if r == root {
            format!("config hash of rank {root}").into_bytes()
        } else {
            vec![7; r + 100]
        };
        d.broadcast_bytes(root, &mut b);
        check(
            "broadcast_bytes",
            String::from_utf8_lossy(&b).into_owned(),
            format!("config hash of rank {root}"),
        )?;
    }
    check("same_on_all_ranks(same)", d.same_on_all_ranks(b"abc"), true)?;
    let differs = if r == n - 1 { b"abd" } else { b"abc" };
    check("same_on_all_ranks(one differs)", d.same_on_all_ranks(differs), n == 1)?;

    // ZeRO-1: 7 real elements padded to a multiple of n; rank r contributes i + 100 r at i.
    let total = padded_len(7, n);
    let input: Vec<f32> =
        (0..total).map(|i| if i < 7 { (i + 100 * r) as f32 } else { 0.0 }).collect();
    let shard = d.reduce_scatter_sum(&input);
    let k = total / n;
    let all_ranks = (100 * n * (n - 1) / 2) as f32;
    let want: Vec<f32> = (r * k..(r + 1) * k)
        .map(|i| if i < 7 { i as f32 * n as f32 + all_ranks } else { 0.0 })
        .collect();
    check("reduce_scatter_sum", shard, want)?;
    let mine: Vec<f32> = (0..3).map(|j| (10 * r + j) as f32).collect();
    let want: Vec<f32> = (0..n).flat_map(|q| (0..3).map(move |j| (10 * q + j) as f32)).collect();
    check("all_gather", d.all_gather(&mine), want)?;

    check("all_agree(none)", d.all_agree(false), false)?;
    check("all_agree(last rank)", d.all_agree(r == n - 1), true)?;
    check("all_agree(all)", d.all_agree(true), true)?;
    d.barrier();

    // Gradient averaging: shapes straddling 4-element buckets, one bf16 tensor; rank r holds
    // (r + 1) * base, so the mean is base * (n + 1) / 2.
    let dev = Device::Cpu;
    let base = [
        Tensor::arange(0f32, 6.0, &dev).and_then(|t| t.reshape((2, 3))),
        Tensor::arange(-2f32, 3.0, &dev),
        Tensor::arange(0f32, 4.0, &dev)
            .and_then(|t| t.reshape((1, 1, 4)))
            .and_then(|t| t.to_dtype(DType::BF16)),
        Tensor::new(&[0.5f32], &dev),
    ]
    .into_iter()
    .collect::<candle_core::Result<Vec<_>>>()
    .map_err(|e| e.to_string())?;
    let mine = base
        .iter()
        .map(|t| t.affine((r + 1) as f64, 0.0))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let avg = d.all_reduce_mean_tensors_bucketed(&mine, 4).map_err(|e| e.to_string())?;
    check("gradient count", avg.len(), base.len())?;
    for (i, (a, b)) in avg.iter().zip(&base).enumerate() {
        check(&format!("gradient {i} shape/dtype"), (a.dims(), a.dtype()), (b.dims(), b.dtype()))?;
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| e.to_string())
        };
        let want: Vec<f32> = flat(b)?.iter().map(|x| x * (n + 1) as f32 / 2.0).collect();
        check(&format!("gradient {i} mean"), flat(a)?, want)?;
    }
    Ok(())
}

/// One all-reduce every rank joins, then the last rank is lost (`lose`) while the others enter a
/// second one. Returns only where the watchdog failed to end the process.
fn lose_last_rank(d: &Dist, lose: impl FnOnce()) -> Result<(), String> {
    if d.size() < 2 {
        return Err("needs at least 2 ranks".into());
    }
    let mut v = vec![1f32; 1000];
    d.all_reduce_sum_in_place(&mut v);
    check("warm-up all_reduce", v[0], d.size() as f32)?;
    if d.rank() == d.size() - 1 {
        eprintln!("dist_selftest: the last rank leaves now");
        lose();
    }
    d.all_reduce_sum_in_place(&mut v);
    Err("the second all-reduce completed without the last rank".into())
}

/// Median of `reps` timed runs of `f`, in seconds.
fn median_s(d: &Dist, reps: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            d.barrier();
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

fn bench(d: &Dist) -> Result<(), String> {
    let elems = motrain::dist::BUCKET_BYTES / 4;
    let mut v = vec![1f32; elems];
    let bucket = median_s(d, 21, || d.all_reduce_sum_in_place(&mut v));
    let agree = median_s(d, 201, || {
        d.all_agree(false);
    });
    if d.is_root() {
        println!(
            "ranks {}: all_reduce of one {} MB bucket {:.2} ms ({:.2} GB/s of bucket), all_agree {:.1} us",
            d.size(),
            motrain::dist::BUCKET_BYTES >> 20,
            bucket * 1e3,
            motrain::dist::BUCKET_BYTES as f64 / bucket / 1e9,
            agree * 1e6
        );
    }
    Ok(())
}
