//! The per-layer statistics of routing (MoE, PESC) and mixing (MoT) that a forward pass
//! records, training logs and eval prints.

use serde::{Deserialize, Serialize};

/// Routing statistics of one MoE layer for one forward call.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct RoutingStats {
    pub layer: usize,
    /// Share of routed slots each expert received.
    pub load: Vec<f64>,
    /// Share of choices (token choice) or tokens (expert choice) that no expert processed.
    pub dropped: f64,
    /// Mean entropy of the router's softmax over experts, in nats.
    pub entropy: f64,
    pub aux_loss: f64,
    pub z_loss: f64,
    /// Mean pairwise cosine similarity of the layer's input tokens (representation collapse);
    /// measured in eval only (0 in training lines).
    pub token_cosine: f64,
}

/// Mixing statistics of one MoT layer for one forward call. Every expert receives exactly one
/// mixed token per group, so what tells a healthy expert from a dead one is how its weights
/// spread over the group.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct MixingStats {
    pub layer: usize,
    pub temperature: f64,
    /// Per expert, the mean over groups of its largest mixing weight: 1/G is a uniform average
    /// of the group, 1 picks a single token.
    pub max_weight: Vec<f64>,
    /// Per expert, the mean entropy of its group softmax in nats (at most ln G).
    pub entropy: Vec<f64>,
}

/// One layer's statistics; serialised with `"kind": "moe"` or `"kind": "mot"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayerStats {
    Moe(RoutingStats),
    Mot(MixingStats),
}

impl LayerStats {
    /// Every averaged number of one layer's statistics, in a fixed order (the layer index is a
    /// name, not a number to average).
    fn numbers_mut(&mut self) -> Vec<&mut f64> {
        match self {
            LayerStats::Moe(s) => {
                let mut v: Vec<&mut f64> = s.load.iter_mut().collect();
                v.extend([
                    &mut s.dropped,
                    &mut s.entropy,
                    &mut s.aux_loss,
                    &mut s.z_loss,
                    &mut s.token_cosine,
                ]);
                v
            }
            LayerStats::Mot(s) => {
                let mut v: Vec<&mut f64> = s.max_weight.iter_mut().collect();
                v.extend(s.entropy.iter_mut());
                v.push(&mut s.temperature);
                v
            }
        }
    }

    /// All layers' numbers as one vector: what ranks sum to agree on the statistics.
    pub fn to_numbers(stats: &[LayerStats]) -> Vec<f64> {
        let mut stats = stats.to_vec();
        stats.iter_mut().flat_map(|s| s.numbers_mut().into_iter().map(|x| *x)).collect()
    }

    /// Replaces the numbers of `stats` by `numbers`, in the order of [`LayerStats::to_numbers`].
    pub fn set_numbers(stats: &mut [LayerStats], numbers: &[f64]) {
        let mut numbers = numbers.iter();
        for x in stats.iter_mut().flat_map(LayerStats::numbers_mut) {
            *x = *numbers.next().expect("as many numbers as to_numbers gave");
        }
    }

    /// Per-layer means over several forward calls (micro-batches, eval batches), which all
    /// ran the same model and so list the same layers in the same order.
    pub fn average(calls: &[Vec<LayerStats>]) -> Vec<LayerStats> {
        let Some(first) = calls.first() else {
            return Vec::new();
        };
        let k = calls.len() as f64;
        let mut mean = vec![0.0; LayerStats::to_numbers(first).len()];
        for call in calls {
            mean.iter_mut().zip(LayerStats::to_numbers(call)).for_each(|(a, b)| *a += b / k);
        }
        let mut out = first.clone();
        LayerStats::set_numbers(&mut out, &mean);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_is_the_mean_of_every_number_and_keeps_the_layer() {
        let moe = |x: f64| {
            LayerStats::Moe(RoutingStats {
                layer: 3,
                load: vec![x, 1.0 - x],
                dropped: x,
                entropy: 2.0 * x,
                aux_loss: 1.0,
                z_loss: x,
                token_cosine: 0.0,
            })
        };
        let mot = |x: f64| {
            LayerStats::Mot(MixingStats {
                layer: 5,
                temperature: x,
                max_weight: vec![x],
                entropy: vec![x, 3.0 * x],
            })
        };
        let avg = LayerStats::average(&[vec![moe(0.25), mot(1.0)], vec![moe(0.75), mot(3.0)]]);
        assert_eq!(avg[0], moe(0.5));
        assert_eq!(avg[1], mot(2.0));
        let numbers = LayerStats::to_numbers(&avg);
        assert_eq!(numbers.len(), 2 + 5 + 1 + 2 + 1);
        let mut back = vec![moe(0.0), mot(0.0)];
        LayerStats::set_numbers(&mut back, &numbers);
        assert_eq!(back, avg);
    }
}
