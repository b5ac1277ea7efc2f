//! Rotary position embedding (Su et al., "RoFormer", 2021) in the Hugging Face
//! "rotate half" layout, evaluated at arbitrary integer positions.
//!
//! SelfExtend needs every query and key rotated at two different positions, so there
//! is no fixed cos/sin table: angles are computed per call, in f64, for exactly the
//! positions asked for. That also means nothing caps the position a model can reach.

use candle_core::{DType, Device, Tensor};

use crate::config::{Config, RopeScaling};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f64>,
}

impl RotaryEmbedding {
    pub fn new(cfg: &Config) -> Self {
        Self::with_params(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref())
    }

    pub fn with_params(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        let inv_freq = match scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old_ctx = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Self { inv_freq }
    }

    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// `cos` and `sin` of shape `(positions.len(), head_dim / 2)`.
    pub fn cos_sin(
        &self,
        positions: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        let shape = (positions.len(), half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotates `xs: (batch, heads, seq, head_dim)`; row `t` is rotated to `positions[t]`.
    pub fn apply(&self, xs: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (cos, sin) = self.cos_sin(positions, xs.dtype(), xs.device())?;
        Ok(candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos, &sin)?)
    }
}
