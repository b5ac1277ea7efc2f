//! Rotary position embedding (Su et al., "RoFormer", 2021) in the Hugging Face
//! "rotate half" layout, evaluated at arbitrary integer positions, with the
//! training-free context-extension scalings users compare SelfExtend against:
//!
//! - position interpolation (Chen et al., "Extending Context Window of Large Language
//!   Models via Positional Interpolation", 2023): `inv_freq / s`;
//! - "NTK-aware" scaling (bloc97, 2023; YaRN paper eq. 16): base `theta * s^(d/(d-2))`;
//! - dynamic NTK (emozilla, 2023; `transformers`' `"dynamic"`): the NTK base recomputed
//!   from the sequence length `n` once it exceeds the trained context `L`,
//!   `theta * (s * n / L - (s - 1))^(d/(d-2))`;
//! - Llama 3.1's frequency-dependent scaling, as checkpoints configure it, or as
//!   llama.cpp stores it (one divisor per frequency, `rope_freqs.weight`);
//! - LongRoPE (Ding et al., "LongRoPE: Extending LLM Context Window Beyond 2 Million
//!   Tokens", 2024) as Phi-3 configures it: per-frequency divisors, short ones up to the
//!   original context and long ones past it, and cos/sin scaled by an attention factor.
//!
//! Partial rotary embeddings (Phi-3's `partial_rotary_factor`) rotate the first
//! `rotary_dim` dimensions of each head ("rotate half" within them) and pass the rest
//! through.
//!
//! SelfExtend needs every query and key rotated at two different positions, so there
//! is no fixed cos/sin table: angles are computed in f64 for exactly the positions
//! asked for, and the table the fused kernel reads grows on demand. Nothing caps the
//! position a model can reach.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Device, DeviceLocation, Tensor, D};

use crate::config::{RopeConfig, RopeScaling};
use crate::error::Result;
use crate::math::Widen;

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `rotary_dim / 2` inverse frequencies, after scaling.
    inv_freq: Vec<f64>,
    /// Multiplies cos and sin (LongRoPE's attention factor; 1 elsewhere).
    attention_factor: f64,
    /// Shared by clones: the table depends only on `inv_freq` and `attention_factor`.
    table: Arc<RwLock<Arc<CosSinTable>>>,
    /// Copies of `table` on devices, as `(rows, rotary_dim / 2)` cos and sin tensors.
    device_tables: Arc<Mutex<Vec<(DeviceLocation, Tensor, Tensor)>>>,
    /// Set where the frequencies depend on the sequence length.
    by_length: Option<ByLength>,
}

#[derive(Debug, Clone)]
enum ByLength {
    DynamicNtk(DynamicNtk),
    /// LongRoPE: the embedding with the long factors, used past `original` positions.
    LongRope {
        original: usize,
        long: Arc<RotaryEmbedding>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct DynamicNtk {
    rotary_dim: usize,
    theta: f64,
    factor: f64,
    trained: usize,
}

impl DynamicNtk {
    /// The base for a sequence of `len` positions; `theta` up to the trained context.
    fn base(&self, len: usize) -> f64 {
        if len <= self.trained {
            return self.theta;
        }
        let d = self.rotary_dim as f64;
        let grown = self.factor * len as f64 / self.trained as f64 - (self.factor - 1.0);
        self.theta * grown.powf(d / (d - 2.0))
    }
}

/// `theta * factor^(d / (d - 2))`: the "NTK-aware" base for a context `factor` times
/// longer, which leaves the highest frequency unchanged and stretches the lowest by
/// `factor`.
pub fn ntk_base(theta: f64, factor: f64, rotary_dim: usize) -> f64 {
    let d = rotary_dim as f64;
    theta * factor.powf(d / (d - 2.0))
}

/// LongRoPE's default attention factor for a context stretched `factor` times beyond
/// `original` positions: `sqrt(1 + ln(factor) / ln(original))`, and 1 when not
/// stretched (`transformers`' `_compute_longrope_parameters`).
pub fn longrope_attention_factor(factor: f64, original: usize) -> f64 {
    if factor <= 1.0 {
        return 1.0;
    }
    (1.0 + factor.ln() / (original as f64).ln()).sqrt()
}

/// f32 cos/sin of positions `0 .. len`, row `p` at `p * half`, scaled by the attention
/// factor.
#[derive(Debug)]
pub struct CosSinTable {
    half: usize,
    len: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl CosSinTable {
    fn new(inv_freq: &[f64], attention_factor: f64, len: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push((c * attention_factor) as f32);
                sin.push((s * attention_factor) as f32);
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

    /// Writes `x` rotated to position `pos` into `out` ("rotate half" layout over the
    /// first `2 * half` dimensions; the rest are copied), widening f16 on the way.
    #[inline(always)]
    pub(crate) fn rotate<T: Widen>(&self, x: &[T], pos: usize, out: &mut [f32]) {
        let h = self.half;
        let (cos, sin) = (&self.cos[pos * h..][..h], &self.sin[pos * h..][..h]);
        let (x1, rest) = x.split_at(h);
        let (x2, pass) = rest.split_at(h);
        let (o1, rest) = out.split_at_mut(h);
        let (o2, out_pass) = rest.split_at_mut(h);
        let full = h - h % 8;
        for c in (0..full).step_by(8) {
            let lanes = |s: &[T]| T::widen8(s[c..c + 8].try_into().expect("8 lanes"));
            let (a, b) = (lanes(x1), lanes(x2));
            let f32s = |s: &[f32]| -> [f32; 8] { s[c..c + 8].try_into().expect("8 lanes") };
            let (co, si) = (f32s(cos), f32s(sin));
            let first: [f32; 8] = std::array::from_fn(|l| a[l] * co[l] - b[l] * si[l]);
            let second: [f32; 8] = std::array::from_fn(|l| b[l] * co[l] + a[l] * si[l]);
            o1[c..c + 8].copy_from_slice(&first);
            o2[c..c + 8].copy_from_slice(&second);
        }
        for i in full..h {
            let (a, b) = (x1[i].widen(), x2[i].widen());
            o1[i] = a * cos[i] - b * sin[i];
            o2[i] = b * cos[i] + a * sin[i];
        }
        for (o, &x) in out_pass.iter_mut().zip(pass) {
            *o = x.widen();
        }
    }
}

/// `rotate_half` RoPE of `xs: (batch, heads, seq, head_dim)` with `cos`, `sin:
/// (seq, rotary_dim / 2)`; dimensions past `rotary_dim` pass through.
pub fn apply_rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rotary_dim = 2 * cos.dim(D::Minus1)?;
    let head_dim = xs.dim(D::Minus1)?;
    if rotary_dim == head_dim {
        return Ok(candle_nn::rotary_emb::rope(&xs.contiguous()?, cos, sin)?);
    }
    let rot = xs.narrow(D::Minus1, 0, rotary_dim)?.contiguous()?;
    let pass = xs.narrow(D::Minus1, rotary_dim, head_dim - rotary_dim)?;
    let rot = candle_nn::rotary_emb::rope(&rot, cos, sin)?;
    Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?)
}

impl RotaryEmbedding {
    pub fn new(rope: &RopeConfig) -> Self {
        Self::with_params(rope.rotary_dim, rope.theta, rope.scaling.as_ref())
    }

    /// The embedding of `rotary_dim` dimensions with base `theta` and `scaling`.
    pub fn with_params(rotary_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        let frequencies = |theta: f64| -> Vec<f64> {
            (0..rotary_dim / 2)
                .map(|i| 1.0 / theta.powf(2.0 * i as f64 / rotary_dim as f64))
                .collect()
        };
        let base = frequencies(theta);
        let divided = |factors: &[f64]| -> Vec<f64> {
            base.iter().zip(factors).map(|(f, s)| f / s).collect()
        };
        let mut by_length = None;
        let mut attention_factor = 1.0;
        let inv_freq = match scaling {
            None => base.clone(),
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(&RopeScaling::Ntk { factor }) => frequencies(ntk_base(theta, factor, rotary_dim)),
            Some(&RopeScaling::DynamicNtk {
                factor,
                original_max_position_embeddings,
            }) => {
                by_length = Some(ByLength::DynamicNtk(DynamicNtk {
                    rotary_dim,
                    theta,
                    factor,
                    trained: original_max_position_embeddings.max(1),
                }));
                base.clone()
            }
            Some(&RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => llama3_frequencies(
                &base,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            ),
            Some(RopeScaling::Frequencies { factors }) => divided(factors),
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor: af,
            }) => {
                attention_factor = *af;
                let long = Self::from_frequencies(divided(long_factor), attention_factor, None);
                by_length = Some(ByLength::LongRope {
                    original: *original_max_position_embeddings,
                    long: Arc::new(long),
                });
                divided(short_factor)
            }
        };
        Self::from_frequencies(inv_freq, attention_factor, by_length)
    }

    /// An embedding over `inv_freq`, its tables built on first use.
    fn from_frequencies(
        inv_freq: Vec<f64>,
        attention_factor: f64,
        by_length: Option<ByLength>,
    ) -> Self {
        Self {
            inv_freq,
            attention_factor,
            table: Arc::new(RwLock::new(Arc::new(CosSinTable::new(&[], 1.0, 0)))),
            device_tables: Arc::default(),
            by_length,
        }
    }

    /// Inverse frequencies `theta^(-2i/d)` after scaling; for length-dependent scalings,
    /// those of sequences within the original context (see [`RotaryEmbedding::at_length`]).
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// The number of leading head dimensions this embedding rotates.
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// The embedding for a sequence of `len` positions: `self`, except past the
    /// original context under dynamic NTK (the base grows with `len`) and LongRoPE (the
    /// long factors apply).
    pub fn at_length(&self, len: usize) -> Cow<'_, Self> {
        match &self.by_length {
            Some(ByLength::DynamicNtk(d)) if len > d.trained => {
                Cow::Owned(Self::with_params(d.rotary_dim, d.base(len), None))
            }
            Some(ByLength::LongRope { original, long }) if len > *original => {
                Cow::Borrowed(long.as_ref())
            }
            _ => Cow::Borrowed(self),
        }
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
            *table = Arc::new(CosSinTable::new(
                &self.inv_freq,
                self.attention_factor,
                grown,
            ));
        }
        Arc::clone(&table)
    }

    /// [`RotaryEmbedding::table`] on `device`: f32 `cos` and `sin` of positions
    /// `0 .. len` (at least), `(rows, rotary_dim / 2)`. Uploaded once per growth, so a
    /// decode step gathers its rows on the device instead of recomputing angles.
    pub fn device_table(&self, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let location = device.location();
        let mut kept = self.device_tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, cos, sin)) = kept
            .iter()
            .find(|(at, cos, _)| *at == location && cos.dims()[0] >= len)
        {
            return Ok((cos.clone(), sin.clone()));
        }
        let table = self.table(len);
        let shape = (table.len, table.half);
        let cos = Tensor::from_slice(&table.cos, shape, device)?;
        let sin = Tensor::from_slice(&table.sin, shape, device)?;
        kept.retain(|(at, _, _)| *at != location);
        kept.push((location, cos.clone(), sin.clone()));
        Ok((cos, sin))
    }

    /// `cos` and `sin` of shape `(positions.len(), rotary_dim / 2)`.
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
                cos.push((c * self.attention_factor) as f32);
                sin.push((s * self.attention_factor) as f32);
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
        apply_rotary(xs, &cos, &sin)
    }
}

/// Llama 3.1's scaling: high frequencies kept, low ones divided by `factor`, and a
/// smooth blend between the two wavelength bounds.
fn llama3_frequencies(
    base: &[f64],
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original: usize,
) -> Vec<f64> {
    let old_ctx = original as f64;
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
                let smooth =
                    (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: usize = 64;
    const THETA: f64 = 10_000.0;

    fn freqs(scaling: Option<RopeScaling>) -> Vec<f64> {
        RotaryEmbedding::with_params(D, THETA, scaling.as_ref())
            .inv_freq()
            .to_vec()
    }

    #[test]
    fn linear_divides_every_frequency() {
        let (plain, scaled) = (
            freqs(None),
            freqs(Some(RopeScaling::Linear { factor: 4.0 })),
        );
        for (p, s) in plain.iter().zip(&scaled) {
            assert!((p / s - 4.0).abs() < 1e-12);
        }
    }

    #[test]
    fn ntk_keeps_the_highest_and_stretches_the_lowest_frequency() {
        let (plain, scaled) = (freqs(None), freqs(Some(RopeScaling::Ntk { factor: 4.0 })));
        assert_eq!(plain[0], scaled[0]);
        let last = D / 2 - 1;
        assert!((plain[last] / scaled[last] - 4.0).abs() < 1e-9);
        assert!(plain.iter().zip(&scaled).all(|(p, s)| s <= p));
    }

    #[test]
    fn dynamic_ntk_follows_the_sequence_length() {
        let dynamic = RotaryEmbedding::with_params(
            D,
            THETA,
            Some(&RopeScaling::DynamicNtk {
                factor: 1.0,
                original_max_position_embeddings: 1000,
            }),
        );
        assert!(matches!(dynamic.at_length(1000), Cow::Borrowed(_)));
        assert_eq!(dynamic.inv_freq(), freqs(None).as_slice());
        // With factor 1, length n is NTK scaling by n / L.
        let at_4000 = dynamic.at_length(4000);
        let ntk = freqs(Some(RopeScaling::Ntk { factor: 4.0 }));
        for (a, b) in at_4000.inv_freq().iter().zip(&ntk) {
            assert!((a / b - 1.0).abs() < 1e-12, "{a} vs {b}");
        }
        // transformers' formula with factor 2 at n = 3L: base * (2 * 3 - 1)^(d/(d-2)).
        let dynamic = RotaryEmbedding::with_params(
            D,
            THETA,
            Some(&RopeScaling::DynamicNtk {
                factor: 2.0,
                original_max_position_embeddings: 1000,
            }),
        );
        let expected = THETA * 5f64.powf(D as f64 / (D as f64 - 2.0));
        let got = dynamic.at_length(3000).inv_freq()[1];
        assert!((got / expected.powf(-2.0 / D as f64) - 1.0).abs() < 1e-12);
    }
}
