//! Partial NeoX-style rotary embeddings with optional YaRN (spec §9). Frequencies are computed
//! the way transformers computes them (f32 tensors, f64 scalars), so positions far into the
//! context rotate by the same angles as in the reference.

use crate::config::{RopeConfig, RopeScaling};

pub struct Rope {
    /// One frequency per rotated pair: `rotary_dim / 2` entries.
    pub inv_freq: Vec<f32>,
    /// YaRN's magnitude correction, multiplied into cos and sin (1 without YaRN).
    pub attention_factor: f32,
    pub rotary_dim: usize,
}

impl Rope {
    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Rope {
        let dim = (head_dim as f64 * cfg.partial_rotary_factor) as usize;
        let half = dim / 2;
        let base = cfg.theta as f32;
        // base^(2i/dim) in f32, as `base ** (torch.arange(0, dim, 2).float() / dim)`.
        let pos_freqs: Vec<f32> = (0..half)
            .map(|i| {
                let e = (2 * i) as f32 / dim as f32;
                (base as f64).powf(e as f64) as f32
            })
            .collect();
        match &cfg.scaling {
            RopeScaling::None => Rope {
                inv_freq: pos_freqs.iter().map(|&p| 1.0 / p).collect(),
                attention_factor: 1.0,
                rotary_dim: dim,
            },
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let af = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                    }
                    _ => get_mscale(*factor, 1.0),
                };
                let base64 = cfg.theta;
                let lorig = *original_max_position_embeddings as f64;
                let corr = |rot: f64| {
                    dim as f64 * (lorig / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base64.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let (low32, span32) = (low as f32, (high - low) as f32);
                let factor32 = *factor as f32;
                let inv_freq = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let ramp = ((i as f32 - low32) / span32).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        let extrap = 1.0 / p;
                        let interp = 1.0 / (factor32 * p);
                        interp * (1.0 - extrapolation_factor) + extrap * extrapolation_factor
                    })
                    .collect();
                Rope {
                    inv_freq,
                    attention_factor: af as f32,
                    rotary_dim: dim,
                }
            }
        }
    }

    /// cos and sin of every pair at position `pos`, scaled by the attention factor.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let phi = p * f;
            cos[i] = phi.cos() * self.attention_factor;
            sin[i] = phi.sin() * self.attention_factor;
        }
    }

    /// Rotates the first `rotary_dim` dims of one head (pairs `i`, `i + rotary_dim/2`).
    pub fn apply(&self, head: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.rotary_dim / 2;
        let (a, rest) = head.split_at_mut(half);
        let b = &mut rest[..half];
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}
