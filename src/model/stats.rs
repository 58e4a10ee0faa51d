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
    /// Per-layer means over several forward calls (micro-batches, eval batches), which all
    /// ran the same model and so list the same layers in the same order.
    pub fn average(calls: &[Vec<LayerStats>]) -> Vec<LayerStats> {
        let Some(first) = calls.first() else {
            return Vec::new();
        };
        let k = calls.len() as f64;
        let mean =
            |acc: &mut [f64], v: &[f64]| acc.iter_mut().zip(v).for_each(|(a, b)| *a += b / k);
        (0..first.len())
            .map(|i| match &first[i] {
                LayerStats::Moe(s0) => {
                    let mut acc = RoutingStats {
                        layer: s0.layer,
                        load: vec![0.0; s0.load.len()],
                        ..Default::default()
                    };
                    for s in calls.iter().filter_map(|c| match &c[i] {
                        LayerStats::Moe(s) => Some(s),
                        LayerStats::Mot(_) => None,
                    }) {
                        mean(&mut acc.load, &s.load);
                        acc.dropped += s.dropped / k;
                        acc.entropy += s.entropy / k;
                        acc.aux_loss += s.aux_loss / k;
                        acc.z_loss += s.z_loss / k;
                        acc.token_cosine += s.token_cosine / k;
                    }
                    LayerStats::Moe(acc)
                }
                LayerStats::Mot(s0) => {
                    let e = s0.max_weight.len();
                    let mut acc = MixingStats {
                        layer: s0.layer,
                        max_weight: vec![0.0; e],
                        entropy: vec![0.0; e],
                        ..Default::default()
                    };
                    for s in calls.iter().filter_map(|c| match &c[i] {
                        LayerStats::Mot(s) => Some(s),
                        LayerStats::Moe(_) => None,
                    }) {
                        mean(&mut acc.max_weight, &s.max_weight);
                        mean(&mut acc.entropy, &s.entropy);
                        acc.temperature += s.temperature / k;
                    }
                    LayerStats::Mot(acc)
                }
            })
            .collect()
    }
}
