//! The randomness every part of motrain derives from the run's seed: a stateless counter hash,
//! seeded generators, and normal samples. Keeping them here lets data order, initialisation,
//! dropout and sampling all be reproduced from `run.seed` alone.

use rand::{Rng, SeedableRng};

/// The generator behind every seeded stream.
pub type SeededRng = rand_chacha::ChaCha8Rng;

/// SplitMix64: a stateless, well-mixed hash of a counter.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for stream `index` of `seed`: different indices give unrelated streams.
pub fn derive(seed: u64, index: u64) -> u64 {
    splitmix64(seed ^ splitmix64(index))
}

/// A generator seeded with `seed`.
pub fn seeded(seed: u64) -> SeededRng {
    SeededRng::seed_from_u64(seed)
}

/// A standard normal sample in f32 (Box–Muller, cosine branch); `u1` is floored at `1e-12` so
/// that `ln` stays finite.
pub fn normal_f32(rng: &mut impl Rng) -> f32 {
    let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// A standard normal sample in f64 (Box–Muller, cosine branch).
pub fn normal_f64(rng: &mut impl Rng) -> f64 {
    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_samples_have_unit_moments() {
        let mut rng = seeded(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| normal_f64(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean}, var {var}");
        let ys: Vec<f32> = (0..n).map(|_| normal_f32(&mut rng)).collect();
        let var32 = ys.iter().map(|&y| (y as f64).powi(2)).sum::<f64>() / n as f64;
        assert!((var32 - 1.0).abs() < 0.02, "var {var32}");
    }

    #[test]
    fn derived_streams_differ() {
        assert_ne!(derive(1, 0), derive(1, 1));
        assert_ne!(derive(1, 0), derive(2, 0));
        assert_eq!(derive(3, 4), splitmix64(3 ^ splitmix64(4)));
    }
}
