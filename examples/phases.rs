use motrain::config::Config;
use motrain::train::Trainer;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    candle_core::utils::with_threadpool(|| -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let cfg = Config::load(std::path::Path::new(&args[1]), &args[2..])?;
    let mut t = Trainer::new(cfg)?;
    t.train_step()?;
    for _ in 0..3 {
        let batch = t.loader.next_batch(t.cfg.train.micro_batch_size);
        let a = Instant::now();
        let loss = t.model.loss(&batch, true)?;
        let b = Instant::now();
        let grads = loss.backward()?;
        let c = Instant::now();
        let gs: Vec<_> = t.opt.slots.iter().map(|s| grads.get(&s.var).unwrap().clone()).collect();
        let n = motrain::train::global_norm(&gs)?;
        let d = Instant::now();
        t.opt.step(&gs, 1e-3, 1.0)?;
        let e = Instant::now();
        println!("fwd {:.3} bwd {:.3} norm {:.3} opt {:.3} (norm {n:.3})", (b-a).as_secs_f64(), (c-b).as_secs_f64(), (d-c).as_secs_f64(), (e-d).as_secs_f64());
    }
    Ok(())
    })
}
