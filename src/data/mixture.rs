//! Train sources mixed by weight (`[[data.sources]]`; a single-source config is a mixture of
//! one). Each row of a batch comes from one source, chosen by a fixed rule on the rows every
//! source has given so far: the next row goes to the source whose count lags its weight the
//! most, `argmax_i(w_i·(g + 1) − n_i)` after `g` rows, ties to the first. No randomness is
//! involved, so the realized shares stay within about one row of the weights at every point,
//! every rank plans the same global batch, and the per-source cursors `n_i` are the whole
//! state a checkpoint needs. Each source draws its windows with its own sampler state.

use super::loader::{Batch, EvalStream, TrainLoader};
use super::{shards, DataError};
use crate::config::DataConfig;

/// One train source: its name, its normalised weight and its windows.
pub struct Source {
    pub name: String,
    pub weight: f64,
    pub loader: TrainLoader,
}

/// One row of a planned batch: which source, and which of its windows (its cursor position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub source: usize,
    pub window: u64,
}

pub struct Mixture {
    pub sources: Vec<Source>,
}

/// The seed of source `i`'s sampler: the run seed itself for the first, so that a one-source
/// mixture draws the windows of a single-source run; for the others a seed derived from the
/// run seed and `i`, so that two sources over the same shards draw independently.
pub fn source_seed(seed: u64, i: usize) -> u64 {
    if i == 0 {
        seed
    } else {
        crate::rng::derive(seed, i as u64)
    }
}

/// Names `data.sources[i]` in errors about its shards (a single-source config is named as
/// before, by its glob alone).
fn in_source(data: &DataConfig, i: usize, key: &str, e: DataError) -> DataError {
    match &data.sources {
        Some(s) => DataError::Source {
            key: format!("data.sources[{i}] ({}) {key}", s[i].name),
            inner: Box::new(e),
        },
        None => e,
    }
}

impl Mixture {
    /// Opens every source's train shards; `seed` is the run seed.
    pub fn open(data: &DataConfig, vocab_size: usize, seed: u64) -> Result<Mixture, DataError> {
        let mut sources = Vec::new();
        for (i, s) in data.source_list().into_iter().enumerate() {
            let loader = shards::open_all(&s.train, &data.format, vocab_size)
                .and_then(|shards| TrainLoader::new(shards, data.seq_len, source_seed(seed, i)))
                .map_err(|e| in_source(data, i, "train", e))?
                .with_sampler(data.sampler);
            sources.push(Source { name: s.name, weight: s.weight, loader });
        }
        Ok(Mixture::new(sources))
    }

    /// A mixture of `sources`, their weights normalised to sum to 1.
    pub fn new(mut sources: Vec<Source>) -> Mixture {
        let total: f64 = sources.iter().map(|s| s.weight).sum();
        sources.iter_mut().for_each(|s| s.weight /= total);
        Mixture { sources }
    }

    /// Rows drawn so far, over all sources.
    pub fn drawn(&self) -> u64 {
        self.sources.iter().map(|s| s.loader.cursor).sum()
    }

    /// Rows drawn so far from each source.
    pub fn cursors(&self) -> Vec<u64> {
        self.sources.iter().map(|s| s.loader.cursor).collect()
    }

    /// Continues from `cursors`, one per source, as [`Mixture::cursors`] returned them.
    pub fn set_cursors(&mut self, cursors: &[u64]) -> Result<(), String> {
        if cursors.len() != self.sources.len() {
            return Err(format!(
                "{} cursors for {} train sources",
                cursors.len(),
                self.sources.len()
            ));
        }
        self.sources.iter_mut().zip(cursors).for_each(|(s, &c)| s.loader.cursor = c);
        Ok(())
    }

    /// The next `rows` rows, without drawing them.
    pub fn plan(&self, rows: usize) -> Vec<Row> {
        let mut counts = self.cursors();
        let mut drawn: u64 = counts.iter().sum();
        let mut plan = Vec::with_capacity(rows);
        for _ in 0..rows {
            drawn += 1;
            let (mut best, mut lag) = (0, f64::NEG_INFINITY);
            for (i, s) in self.sources.iter().enumerate() {
                let l = s.weight * drawn as f64 - counts[i] as f64;
                if l > lag {
                    (best, lag) = (i, l);
                }
            }
            plan.push(Row { source: best, window: counts[best] });
            counts[best] += 1;
        }
        plan
    }

    /// The windows of `rows` as a batch named `index` (its first row's position in the mixed
    /// stream).
    pub fn read(&self, rows: &[Row], index: u64) -> Batch {
        let seq_len = self.seq_len();
        let mut batch = Batch::with_capacity(rows.len(), seq_len, index);
        let mut window = vec![0u32; seq_len + 1];
        for r in rows {
            self.sources[r.source].loader.read_window(r.window, &mut window);
            batch.push_window(&window);
        }
        batch
    }

    /// Marks the planned `rows` as drawn.
    pub fn advance(&mut self, rows: &[Row]) {
        for r in rows {
            self.sources[r.source].loader.cursor += 1;
        }
    }

    pub fn total_tokens(&self) -> usize {
        self.sources.iter().map(|s| s.loader.total_tokens()).sum()
    }

    /// Tokens per row's inputs (every source is cut into windows of `seq_len + 1`).
    pub fn seq_len(&self) -> usize {
        self.sources[0].loader.seq_len()
    }
}

/// A source's val shards, evaluated alone.
pub struct ValSource {
    pub name: String,
    /// The source's normalised train weight, which weighs its val loss in the overall one.
    pub weight: f64,
    pub stream: EvalStream,
}

/// The val shards of every source that has them.
pub fn open_val(data: &DataConfig, vocab_size: usize) -> Result<Vec<ValSource>, DataError> {
    let sources = data.source_list();
    let total: f64 = sources.iter().map(|s| s.weight).sum();
    let mut out = Vec::new();
    for (i, s) in sources.into_iter().enumerate() {
        let Some(glob) = &s.val else { continue };
        let shards = shards::open_all(glob, &data.format, vocab_size)
            .map_err(|e| in_source(data, i, "val", e))?;
        out.push(ValSource {
            name: s.name,
            weight: s.weight / total,
            stream: EvalStream::new(shards, data.seq_len),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shards::write_shard;
    use crate::data::Shard;

    /// A mixture of sources with these weights, each over its own shard whose tokens start at
    /// `1000·i`, so a window tells its source.
    fn mixture(dir: &std::path::Path, weights: &[f64]) -> Mixture {
        let sources = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let p = dir.join(format!("s{i}.bin"));
                let toks: Vec<u32> = (0..200).map(|k| 1000 * i as u32 + k).collect();
                write_shard(&p, &toks, 65536).unwrap();
                let shards = vec![Shard::open(&p, "llmc", None).unwrap()];
                let loader = TrainLoader::new(shards, 4, source_seed(9, i)).unwrap();
                Source { name: format!("s{i}"), weight: w, loader }
            })
            .collect();
        Mixture::new(sources)
    }

    #[test]
    fn realized_shares_track_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        for weights in [vec![0.7, 0.3], vec![5.0, 3.0, 1.0, 1.0], vec![0.01, 0.99], vec![1.0]] {
            let mut m = mixture(dir.path(), &weights);
            let total: f64 = weights.iter().sum();
            let batch = 24;
            let mut counts = vec![0u64; weights.len()];
            for b in 1..=1000u64 {
                let plan = m.plan(batch);
                for r in &plan {
                    assert_eq!(r.window, m.sources[r.source].loader.cursor + counts_in(&plan, r));
                    counts[r.source] += 1;
                }
                m.advance(&plan);
                assert_eq!(m.cursors(), counts);
                let rows = (b * batch as u64) as f64;
                for (i, &w) in weights.iter().enumerate() {
                    let expected = w / total * rows;
                    assert!(
                        (counts[i] as f64 - expected).abs() <= 2.0,
                        "{weights:?}: source {i} has {} rows after {rows}, expected {expected:.1}",
                        counts[i]
                    );
                }
            }
            // Over 1000 batches, each share is within 2 % of its weight (in fact within 2 rows).
            for (i, &w) in weights.iter().enumerate() {
                let share = counts[i] as f64 / (1000 * batch) as f64;
                assert!((share - w / total).abs() <= 0.02 * w / total, "{weights:?}: {share}");
            }
        }
    }

    /// How many rows of `plan` before `r` come from `r`'s source.
    fn counts_in(plan: &[Row], r: &Row) -> u64 {
        plan.iter().take_while(|x| *x != r).filter(|x| x.source == r.source).count() as u64
    }

    #[test]
    fn plans_resume_from_the_cursors_and_rows_read_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = mixture(dir.path(), &[0.6, 0.3, 0.1]);
        let first = a.plan(10);
        a.advance(&first);
        let second = a.plan(10);
        let mut b = mixture(dir.path(), &[0.6, 0.3, 0.1]);
        b.set_cursors(&a.cursors()).unwrap();
        assert_eq!(b.plan(10), second, "a mixture restored from its cursors plans the same rows");
        assert!(b.set_cursors(&[1, 2]).is_err());
        let batch = a.read(&second, a.drawn());
        assert_eq!(batch.index, 10);
        for (k, r) in second.iter().enumerate() {
            let token = batch.inputs[k * 4];
            assert_eq!(token / 1000, r.source as u32, "row {k} comes from source {}", r.source);
        }
        // One source of weight 1 reads what that source's loader alone reads.
        let mut one = mixture(dir.path(), &[1.0]);
        let mut alone = TrainLoader::new(
            vec![Shard::open(&dir.path().join("s0.bin"), "llmc", None).unwrap()],
            4,
            9,
        )
        .unwrap();
        for _ in 0..3 {
            let plan = one.plan(5);
            assert_eq!(one.read(&plan, one.drawn()), alone.next_batch(5));
            one.advance(&plan);
        }
    }
}
