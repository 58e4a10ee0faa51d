//! Learning-rate schedules of `product.md`: linear warm-up, then cosine, linear, constant or
//! warmup-stable-decay, all ending at `min_lr_ratio · lr`.

use crate::config::{Schedule, TrainConfig};

pub fn learning_rate(t: &TrainConfig, step: usize) -> f64 {
    let n = if t.schedule_steps > 0 { t.schedule_steps } else { t.steps };
    let (lr, r, w) = (t.lr, t.min_lr_ratio, t.warmup_steps);
    if step < w {
        return lr * (step + 1) as f64 / w as f64;
    }
    let span = n.saturating_sub(w).max(1) as f64;
    let progress = ((step - w) as f64 / span).min(1.0);
    match t.schedule {
        Schedule::Constant => lr,
        Schedule::Cosine => {
            lr * (r + (1.0 - r) / 2.0 * (1.0 + (std::f64::consts::PI * progress).cos()))
        }
        Schedule::Linear => lr * (1.0 - (1.0 - r) * progress),
        Schedule::Wsd => {
            let decay = (n as f64 * 0.2).max(1.0);
            let start = n as f64 - decay;
            if (step as f64) < start {
                lr
            } else {
                lr * (1.0 - (1.0 - r) * ((step as f64 - start) / decay).min(1.0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: Schedule) -> TrainConfig {
        TrainConfig {
            lr: 1.0,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            steps: 110,
            schedule: s,
            ..Default::default()
        }
    }

    #[test]
    fn shapes_of_the_schedules() {
        let c = cfg(Schedule::Cosine);
        assert_eq!(learning_rate(&c, 0), 0.1);
        assert_eq!(learning_rate(&c, 9), 1.0);
        assert!((learning_rate(&c, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&c, 60) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&c, 110) - 0.1).abs() < 1e-12);
        let l = cfg(Schedule::Linear);
        assert!((learning_rate(&l, 60) - 0.55).abs() < 1e-12);
        assert_eq!(learning_rate(&cfg(Schedule::Constant), 100), 1.0);
        let w = cfg(Schedule::Wsd);
        assert_eq!(learning_rate(&w, 80), 1.0);
        assert!((learning_rate(&w, 99) - (1.0 - 0.9 * 11.0 / 22.0)).abs() < 1e-12);
    }
}
