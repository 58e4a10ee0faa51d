//! The shard reader on arbitrary bytes: `Shard::open` as llm.c and as nanoGPT, then every token
//! through `get` and `read`, then the eval stream over it. Errors are fine; panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use motrain::data::loader::EvalStream;
use motrain::data::shards::Shard;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("motrain-fuzz-shard-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("shard.bin");
    std::fs::write(&path, data).unwrap();
    // The last byte picks the vocab size and the eval shape, so the seeds stay real files.
    let knob = data.last().copied().unwrap_or(0) as usize;
    let vocab = [16, 64, 50257, 65536, 70001, usize::MAX][knob % 6];
    let seq_len = 1 + (knob >> 3) % 16;
    let batch_size = 1 + knob % 3;
    for format in ["llmc", "nanogpt"] {
        let Ok(shard) = Shard::open(&path, format, Some(vocab)) else { continue };
        let n = shard.len();
        let mut all = vec![0u32; n];
        shard.read(0, &mut all);
        for (i, &t) in all.iter().enumerate() {
            assert_eq!(shard.get(i), t);
            assert!((t as usize) < vocab, "token {i} = {t} passed the vocab check of {vocab}");
        }
        let stream = EvalStream::new(vec![shard], seq_len);
        assert_eq!(stream.total_tokens(), n);
        let batches = stream.batches(batch_size, 4);
        for b in 0..batches {
            let batch = stream.batch(b, batch_size);
            assert_eq!(batch.inputs.len(), batch_size * seq_len);
            assert_eq!(batch.targets.len(), batch_size * seq_len);
        }
    }
});
