//! Windows of tokens for training (seeded random offsets, or each window once per epoch in a
//! seeded order; either resumable by a cursor) and for eval (the deterministic stream of
//! `product.md`).

use super::shards::Shard;
use super::DataError;
/// Epoch: each shard cut into windows `k·S … k·S + S` (`seq_len + 1` tokens, consecutive
/// windows sharing one token, as the eval stream; a tail shorter than a window is not used),
/// every window visited once per epoch, in a seeded permutation of the window indices that
/// differs each epoch. Random: windows at seeded random offsets, drawn with replacement.
pub use crate::config::Sampler;
use crate::rng::splitmix64;

/// A batch of `rows` windows: inputs and next-token targets, each `[rows, seq_len]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// The stream position of the first window (train: the loader's cursor; eval: the window
    /// index): names the batch, for noise that must be the same when a run resumes.
    pub index: u64,
}

impl Batch {
    pub(super) fn with_capacity(rows: usize, seq_len: usize, index: u64) -> Batch {
        Batch {
            rows,
            seq_len,
            inputs: Vec::with_capacity(rows * seq_len),
            targets: Vec::with_capacity(rows * seq_len),
            index,
        }
    }

    pub(super) fn push_window(&mut self, w: &[u32]) {
        self.inputs.extend_from_slice(&w[..w.len() - 1]);
        self.targets.extend_from_slice(&w[1..]);
    }
}

/// Training windows of `seq_len + 1` tokens. Window `i` depends only on the seed, the sampler
/// and `i`, so the cursor (windows drawn so far) is the whole state to checkpoint.
pub struct TrainLoader {
    shards: Vec<Shard>,
    /// Cumulative count of valid window starts per shard (random sampler).
    starts: Vec<u64>,
    /// Cumulative count of epoch windows per shard (epoch sampler).
    windows: Vec<u64>,
    seq_len: usize,
    seed: u64,
    sampler: Sampler,
    pub cursor: u64,
}

impl TrainLoader {
    pub fn new(shards: Vec<Shard>, seq_len: usize, seed: u64) -> Result<TrainLoader, DataError> {
        let mut starts = Vec::with_capacity(shards.len());
        let mut windows = Vec::with_capacity(shards.len());
        let (mut total, mut total_windows) = (0u64, 0u64);
        for s in &shards {
            total += s.len().saturating_sub(seq_len) as u64;
            starts.push(total);
            total_windows += (s.len().saturating_sub(1) / seq_len) as u64;
            windows.push(total_windows);
        }
        if total == 0 {
            return Err(DataError::TooShort {
                needed: seq_len + 1,
                what: "the train shards".into(),
            });
        }
        Ok(TrainLoader {
            shards,
            starts,
            windows,
            seq_len,
            seed,
            sampler: Sampler::Random,
            cursor: 0,
        })
    }

    pub fn with_sampler(mut self, sampler: Sampler) -> TrainLoader {
        self.sampler = sampler;
        self
    }

    pub fn total_tokens(&self) -> usize {
        self.shards.iter().map(Shard::len).sum()
    }

    /// Windows in one epoch of the epoch sampler.
    pub fn epoch_windows(&self) -> u64 {
        *self.windows.last().unwrap_or(&0)
    }

    /// The epoch the next window belongs to (0 with the random sampler).
    pub fn epoch(&self) -> u64 {
        match self.sampler {
            Sampler::Random => 0,
            Sampler::Epoch => self.cursor / self.epoch_windows(),
        }
    }

    pub fn next_batch(&mut self, rows: usize) -> Batch {
        let mut batch = Batch::with_capacity(rows, self.seq_len, self.cursor);
        let mut window = vec![0u32; self.seq_len + 1];
        for _ in 0..rows {
            self.read_window(self.cursor, &mut window);
            batch.push_window(&window);
            self.cursor += 1;
        }
        batch
    }

    /// Copies the window drawn at cursor `index` (`seq_len + 1` tokens) into `out`.
    pub fn read_window(&self, index: u64, out: &mut [u32]) {
        let (shard, offset) = self.locate(index);
        self.shards[shard].read(offset, out);
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The epoch window drawn at cursor `index`: a position in the epoch's permutation.
    pub fn epoch_window(&self, index: u64) -> u64 {
        let n = self.epoch_windows();
        let (epoch, j) = (index / n, index % n);
        Permutation::new(n, splitmix64(self.seed ^ splitmix64(epoch ^ 0xE90C_4000_0000_0000)))
            .apply(j)
    }

    fn locate(&self, index: u64) -> (usize, usize) {
        match self.sampler {
            Sampler::Random => {
                let total = *self.starts.last().unwrap();
                let p =
                    splitmix64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ splitmix64(index))
                        % total;
                let shard = self.starts.partition_point(|&end| end <= p);
                let before = if shard == 0 { 0 } else { self.starts[shard - 1] };
                (shard, (p - before) as usize)
            }
            Sampler::Epoch => {
                let w = self.epoch_window(index);
                let shard = self.windows.partition_point(|&end| end <= w);
                let before = if shard == 0 { 0 } else { self.windows[shard - 1] };
                (shard, (w - before) as usize * self.seq_len)
            }
        }
    }
}

/// A keyed bijection of `0..n` held in two words: a balanced Feistel network over the smallest
/// power-of-four domain that covers `n`, with cycle-walking (re-applying it until the value falls
/// below `n`, which takes fewer than four rounds on average since the domain is under `4n`).
pub struct Permutation {
    n: u64,
    half_bits: u32,
    key: u64,
}

impl Permutation {
    const ROUNDS: u64 = 6;

    pub fn new(n: u64, key: u64) -> Permutation {
        let mut half_bits = 1;
        while half_bits < 32 && (1u64 << (2 * half_bits)) < n {
            half_bits += 1;
        }
        Permutation { n, half_bits, key }
    }

    fn round(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in 0..Self::ROUNDS {
            let f = splitmix64(self.key ^ splitmix64(r ^ (k << 40))) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = self.round(i);
        while x >= self.n {
            x = self.round(x);
        }
        x
    }
}

/// The val shards, in sorted order, as one token stream cut into windows `k·S … k·S + S`.
pub struct EvalStream {
    shards: Vec<Shard>,
    ends: Vec<usize>,
    seq_len: usize,
}

impl EvalStream {
    pub fn new(shards: Vec<Shard>, seq_len: usize) -> EvalStream {
        let mut ends = Vec::with_capacity(shards.len());
        let mut total = 0;
        for s in &shards {
            total += s.len();
            ends.push(total);
        }
        EvalStream { shards, ends, seq_len }
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn total_tokens(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn windows(&self) -> usize {
        self.total_tokens().saturating_sub(1) / self.seq_len
    }

    /// The number of full batches of `batch_size` windows, capped at `max_batches`.
    pub fn batches(&self, batch_size: usize, max_batches: usize) -> usize {
        (self.windows() / batch_size).min(max_batches)
    }

    /// Batch `b` of `batch_size` consecutive windows.
    pub fn batch(&self, b: usize, batch_size: usize) -> Batch {
        let mut batch = Batch::with_capacity(batch_size, self.seq_len, (b * batch_size) as u64);
        let mut window = vec![0u32; self.seq_len + 1];
        for k in b * batch_size..(b + 1) * batch_size {
            for (j, t) in window.iter_mut().enumerate() {
                *t = self.token(k * self.seq_len + j);
            }
            batch.push_window(&window);
        }
        batch
    }

    fn token(&self, i: usize) -> u32 {
        let shard = self.ends.partition_point(|&end| end <= i);
        let before = if shard == 0 { 0 } else { self.ends[shard - 1] };
        self.shards[shard].get(i - before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shards::write_shard;

    fn shards(dir: &std::path::Path, lens: &[usize]) -> Vec<Shard> {
        let mut next = 0u32;
        lens.iter()
            .enumerate()
            .map(|(i, &n)| {
                let p = dir.join(format!("s_{i}.bin"));
                let toks: Vec<u32> = (0..n as u32).map(|k| (next + k) % 60000).collect();
                next += n as u32;
                write_shard(&p, &toks, 65536).unwrap();
                Shard::open(&p, "llmc", None).unwrap()
            })
            .collect()
    }

    #[test]
    fn train_windows_are_contiguous_and_resumable() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = TrainLoader::new(shards(dir.path(), &[50, 9, 70]), 8, 3).unwrap();
        let first = a.next_batch(4);
        let second = a.next_batch(4);
        for r in 0..4 {
            let row = &first.inputs[r * 8..(r + 1) * 8];
            assert!(row.windows(2).all(|w| w[1] == w[0] + 1), "window crosses a shard: {row:?}");
            assert_eq!(first.targets[r * 8], row[1]);
        }
        let mut b = TrainLoader::new(shards(dir.path(), &[50, 9, 70]), 8, 3).unwrap();
        b.cursor = 4;
        assert_eq!(b.next_batch(4), second);
    }

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 5, 16, 17, 1000, 4097] {
            let p = Permutation::new(n, 42 + n);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i);
                assert!(j < n && !seen[j as usize], "n={n}: {i} -> {j} twice or out of range");
                seen[j as usize] = true;
            }
        }
        let order: Vec<u64> = (0..10).map(|i| Permutation::new(1000, 7).apply(i)).collect();
        assert_ne!(
            order,
            (0..10).collect::<Vec<u64>>(),
            "a permutation that is the identity shuffles nothing"
        );
    }

    #[test]
    fn epoch_sampler_visits_every_window_once_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        // 50 tokens -> 6 windows of 8 + 1, 9 -> 1, 70 -> 8: 15 windows per epoch.
        let lens = [50, 9, 70];
        let mut a =
            TrainLoader::new(shards(dir.path(), &lens), 8, 3).unwrap().with_sampler(Sampler::Epoch);
        assert_eq!(a.epoch_windows(), 15);
        let mut firsts = Vec::new();
        for _ in 0..15 {
            let b = a.next_batch(1);
            assert!(
                b.inputs.windows(2).all(|w| w[1] == w[0] + 1),
                "window crosses a shard: {:?}",
                b.inputs
            );
            assert_eq!(b.targets[7], b.inputs[7] + 1);
            firsts.push(b.inputs[0]);
        }
        assert_eq!(a.epoch(), 1);
        let mut expect: Vec<u32> =
            (0..6).map(|k| k * 8).chain([50]).chain((0..8).map(|k| 59 + k * 8)).collect();
        let mut got = firsts.clone();
        got.sort();
        expect.sort();
        assert_eq!(got, expect, "each window once per epoch");
        assert_ne!(firsts, expect, "the order is shuffled");
        let second: Vec<u32> = (0..15).map(|_| a.next_batch(1).inputs[0]).collect();
        assert_ne!(second, firsts, "each epoch has its own order");
        let mut b =
            TrainLoader::new(shards(dir.path(), &lens), 8, 3).unwrap().with_sampler(Sampler::Epoch);
        b.cursor = 11;
        let resumed: Vec<u32> = (0..19).map(|_| b.next_batch(1).inputs[0]).collect();
        assert_eq!(resumed[..4], firsts[11..], "resume mid-epoch continues the same order");
        assert_eq!(resumed[4..], second[..], "and the next epoch");
    }

    #[test]
    fn eval_windows_share_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let s = EvalStream::new(shards(dir.path(), &[10, 15]), 4);
        assert_eq!(s.windows(), 6);
        let b = s.batch(1, 2);
        assert_eq!(b.inputs, vec![8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(b.targets, vec![9, 10, 11, 12, 13, 14, 15, 16]);
        assert_eq!(s.batches(4, 10), 1);
    }
}
