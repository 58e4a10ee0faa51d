//! Windows of tokens for training (seeded random offsets, resumable by a cursor) and for eval
//! (the deterministic stream of `product.md`).

use super::shards::Shard;
use super::DataError;
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
    fn with_capacity(rows: usize, seq_len: usize, index: u64) -> Batch {
        Batch {
            rows,
            seq_len,
            inputs: Vec::with_capacity(rows * seq_len),
            targets: Vec::with_capacity(rows * seq_len),
            index,
        }
    }

    fn push_window(&mut self, w: &[u32]) {
        self.inputs.extend_from_slice(&w[..w.len() - 1]);
        self.targets.extend_from_slice(&w[1..]);
    }
}

/// Training windows of `seq_len + 1` tokens at seeded random offsets. Window `i` depends only on
/// the seed and `i`, so the cursor (windows drawn so far) is the whole state to checkpoint.
pub struct TrainLoader {
    shards: Vec<Shard>,
    /// Cumulative count of valid window starts per shard.
    starts: Vec<u64>,
    seq_len: usize,
    seed: u64,
    pub cursor: u64,
}

impl TrainLoader {
    pub fn new(shards: Vec<Shard>, seq_len: usize, seed: u64) -> Result<TrainLoader, DataError> {
        let mut starts = Vec::with_capacity(shards.len());
        let mut total = 0u64;
        for s in &shards {
            total += s.len().saturating_sub(seq_len) as u64;
            starts.push(total);
        }
        if total == 0 {
            return Err(DataError::TooShort {
                needed: seq_len + 1,
                what: "the train shards".into(),
            });
        }
        Ok(TrainLoader { shards, starts, seq_len, seed, cursor: 0 })
    }

    pub fn total_tokens(&self) -> usize {
        self.shards.iter().map(Shard::len).sum()
    }

    pub fn next_batch(&mut self, rows: usize) -> Batch {
        let mut batch = Batch::with_capacity(rows, self.seq_len, self.cursor);
        let mut window = vec![0u32; self.seq_len + 1];
        for _ in 0..rows {
            let (shard, offset) = self.locate(self.cursor);
            self.shards[shard].read(offset, &mut window);
            batch.push_window(&window);
            self.cursor += 1;
        }
        batch
    }

    fn locate(&self, index: u64) -> (usize, usize) {
        let total = *self.starts.last().unwrap();
        let p =
            splitmix64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ splitmix64(index)) % total;
        let shard = self.starts.partition_point(|&end| end <= p);
        let before = if shard == 0 { 0 } else { self.starts[shard - 1] };
        (shard, (p - before) as usize)
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
