//! Rotary position embedding (Su et al., "RoFormer", 2021) in the Hugging Face
//! "rotate half" layout, evaluated at arbitrary integer positions.
//!
//! SelfExtend needs every query and key rotated at two different positions, so there
//! is no fixed cos/sin table: angles are computed in f64 for exactly the positions
//! asked for, and the table the fused kernel reads grows on demand. Nothing caps the
//! position a model can reach.

use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Tensor};

use crate::config::{Config, RopeScaling};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f64>,
    /// Shared by clones: the table depends only on `inv_freq`.
    table: Arc<RwLock<Arc<CosSinTable>>>,
}

/// f32 cos/sin of positions `0 .. len`, row `p` at `p * half`.
#[derive(Debug)]
pub struct CosSinTable {
    half: usize,
    len: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl CosSinTable {
    fn new(inv_freq: &[f64], len: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Self {
            half,
            len,
            cos,
            sin,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `x` rotated to position `pos` into `out` ("rotate half" layout).
    #[inline]
    pub fn rotate(&self, x: &[f32], pos: usize, out: &mut [f32]) {
        let h = self.half;
        let (cos, sin) = (&self.cos[pos * h..][..h], &self.sin[pos * h..][..h]);
        let (x1, x2) = x.split_at(h);
        let (o1, o2) = out.split_at_mut(h);
        for i in 0..h {
            o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
            o2[i] = x2[i] * cos[i] + x1[i] * sin[i];
        }
    }
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
        Self {
            inv_freq,
            table: Arc::new(RwLock::new(Arc::new(CosSinTable::new(&[], 0)))),
        }
    }

    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// A table covering at least positions `0 .. len`. Grown geometrically and kept,
    /// so decoding one token does not recompute the angles of the whole context.
    pub fn table(&self, len: usize) -> Arc<CosSinTable> {
        {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            if table.len >= len {
                return Arc::clone(&table);
            }
        }
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if table.len < len {
            let grown = len.max(2 * table.len).max(4096);
            *table = Arc::new(CosSinTable::new(&self.inv_freq, grown));
        }
        Arc::clone(&table)
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
