//! candle's element-wise ops on rayon's pool (the vendored candle-core's third change,
//! vendor/README.md): with `CANDLE_NUM_THREADS=1`, as motrain runs, an op on 64K elements or
//! more is shared out in chunks over the current rayon pool. Every element must come out as a
//! plain loop computes it, whatever the pool's size, at the ragged end of the last chunk and
//! with a broadcast operand.

use candle_core::{Device, Tensor};

#[test]
fn large_element_wise_ops_match_a_loop_on_any_pool() -> candle_core::Result<()> {
    // Before candle's pool is first built (this file is its own process, with this one test).
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    let dev = Device::Cpu;
    // Past the parallel threshold (64K), and not a whole number of its 16K chunks.
    let (rows, cols) = (300, 331);
    let n = rows * cols;
    let a: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0).collect();
    let b: Vec<f32> = (0..n).map(|i| ((i * 104729) % 877) as f32 / 31.0 + 0.5).collect();
    let row: Vec<f32> = b[..cols].to_vec();
    let (ta, tb) =
        (Tensor::from_slice(&a, (rows, cols), &dev)?, Tensor::from_slice(&b, (rows, cols), &dev)?);
    let trow = Tensor::from_slice(&row, (1, cols), &dev)?;
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let prod: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
    let bcast: Vec<f32> = a.iter().enumerate().map(|(i, x)| x - row[i % cols]).collect();
    let exp: Vec<f32> = a.iter().map(|x| x.exp()).collect();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| -> candle_core::Result<()> {
            let flat = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(flat((&ta + &tb)?)?, sum, "add on {threads} threads");
            assert_eq!(flat((&ta * &tb)?)?, prod, "mul on {threads} threads");
            assert_eq!(
                flat(ta.broadcast_sub(&trow)?)?,
                bcast,
                "broadcast sub on {threads} threads"
            );
            let got = flat(ta.exp()?)?;
            for (i, (g, w)) in got.iter().zip(&exp).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs(),
                    "exp at {i} on {threads} threads: {g} vs {w}"
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}
