//! One decoder for every supported family: the Llama decoder (Touvron et al., "LLaMA:
//! Open and Efficient Foundation Language Models", 2023) as `transformers`'
//! `modeling_llama.py` writes it, generalised by a [`crate::config::Block`] and per-layer attention
//! (see [`crate::family`]) to Qwen2/3, Mistral, Gemma 2/3 and Phi-3, with attention
//! that can apply SelfExtend (Jin et al., ICML 2024).
//!
//! Departures from the reference: the KV cache holds un-rotated keys and RoPE is
//! applied inside attention (see [`crate::kv_cache`]), and logits are always f32.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Module, Storage, Tensor, D};
use candle_nn::Embedding;

use crate::attention::{
    run_attention_ragged, AttentionBackend, AttentionParams, Positions, Ragged,
};
use crate::config::{Activation, Config, Norm, RopeScaling};
use crate::error::Result;
use crate::kv_cache::{KvCache, LayerCache};
use crate::loader::Weights;
use crate::math::silu;
use crate::model::qmatrix::QMatrix;
use crate::rope::RotaryEmbedding;

/// From this many input rows on, a layer on candle's quantized blocks (the K-quants) on
/// the CPU dequantizes its weight for the call and runs the dense gemm: `QMatMul` wins
/// on the few rows of decode, where reading weights is the cost; on prefill chunks the
/// gemm is several times faster and the one-off dequantization is amortised over the
/// rows. Our own kernel ([`QMatrix`]) needs no such switch: it beats dequantizing and
/// the gemm at every chunk length (`BENCHMARKS.md`).
const DENSE_FROM_ROWS: usize = 32;

/// A linear layer over dense weights (gemm), Q4_0/Q4_1/Q8_0 blocks on the CPU (our
/// kernel, [`QMatrix`]), or other quantized GGUF blocks (candle's `QMatMul`).
#[derive(Debug, Clone)]
enum Linear {
    Dense(candle_nn::Linear),
    Quantized {
        weight: QMatMul,
        blocks: Arc<QTensor>,
        bias: Option<Tensor>,
    },
    Packed {
        weight: Arc<QMatrix>,
        bias: Option<Tensor>,
    },
}

/// What one token's pass through linear layers costs: a multiply-add per weight, and
/// the bytes of the weights (and biases) as the kernels read them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinearCost {
    pub weights: usize,
    pub bytes: usize,
}

impl std::ops::Add for LinearCost {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            weights: self.weights + other.weights,
            bytes: self.bytes + other.bytes,
        }
    }
}

impl std::iter::Sum for LinearCost {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| a + b)
    }
}

impl Linear {
    fn cost(&self) -> LinearCost {
        let tensor_bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let bias_bytes = |b: Option<&Tensor>| b.map_or(0, tensor_bytes);
        match self {
            Self::Dense(l) => LinearCost {
                weights: l.weight().elem_count(),
                bytes: tensor_bytes(l.weight()) + bias_bytes(l.bias()),
            },
            Self::Quantized { blocks, bias, .. } => LinearCost {
                weights: blocks.shape().elem_count(),
                bytes: blocks.storage_size_in_bytes() + bias_bytes(bias.as_ref()),
            },
            Self::Packed { weight, bias } => LinearCost {
                weights: weight.out_features() * weight.in_features(),
                bytes: weight.bytes() + bias_bytes(bias.as_ref()),
            },
        }
    }

    fn is_quantized(&self) -> bool {
        !matches!(self, Self::Dense(_))
    }

    fn quantized(blocks: QTensor, bias: Option<Tensor>) -> Result<Self> {
        if blocks.device().is_cpu() {
            if let Some(weight) = QMatrix::from_qtensor(&blocks)? {
                return Ok(Self::Packed {
                    weight: Arc::new(weight),
                    bias,
                });
            }
        }
        let blocks = Arc::new(blocks);
        Ok(Self::Quantized {
            weight: QMatMul::from_arc(Arc::clone(&blocks))?,
            blocks,
            bias,
        })
    }

    /// The packed matrix, while this layer is its only holder (at load).
    fn packed_mut(&mut self) -> Option<&mut QMatrix> {
        match self {
            Self::Packed { weight, .. } => Arc::get_mut(weight),
            _ => None,
        }
    }

    fn out_features(&self) -> usize {
        match self {
            Self::Dense(l) => l.weight().dims()[0],
            Self::Quantized { blocks, .. } => blocks.shape().dims()[0],
            Self::Packed { weight, .. } => weight.out_features(),
        }
    }

    /// `xs: (batch, rows, in)` where the rows are the consecutive segments of
    /// `segments` (one per sequence of a batched call). A quantized layer picks its path
    /// per segment, so a sequence's result does not depend on what else is in the batch.
    fn forward(&self, xs: &Tensor, segments: &[usize]) -> Result<Tensor> {
        let (ys, bias) = match self {
            Self::Dense(l) => return Ok(l.forward(xs)?),
            Self::Quantized {
                weight,
                blocks,
                bias,
            } => (by_segment(xs, segments, weight, blocks)?, bias),
            // Row by row the same arithmetic whatever the batch, and faster than
            // dequantizing for the gemm even on long prefill chunks.
            Self::Packed { weight, bias } => (packed_forward(weight, xs)?, bias),
        };
        Ok(match bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        })
    }
}

/// Runs each run of consecutive segments that takes the same path through `weight`
/// (few rows) or through a dense gemm over the dequantized `blocks` (from
/// [`DENSE_FROM_ROWS`] rows on, on the CPU), and joins the results.
fn by_segment(
    xs: &Tensor,
    segments: &[usize],
    weight: &QMatMul,
    blocks: &QTensor,
) -> Result<Tensor> {
    let dense_path = |rows: usize| rows >= DENSE_FROM_ROWS && xs.device().is_cpu();
    // Runs of consecutive segments that take the same path: (start, rows, dense).
    let mut runs: Vec<(usize, usize, bool)> = vec![];
    let mut start = 0;
    for &rows in segments {
        let dense = dense_path(rows);
        match runs.last_mut() {
            Some((_, n, d)) if *d == dense => *n += rows,
            _ => runs.push((start, rows, dense)),
        }
        start += rows;
    }
    let row_dim = xs.rank() - 2;
    let mut dequantized = None;
    let mut parts = Vec::with_capacity(runs.len());
    for &(start, rows, dense) in &runs {
        let x = match runs.len() {
            1 => xs.clone(),
            _ => xs.narrow(row_dim, start, rows)?,
        };
        parts.push(if dense {
            if dequantized.is_none() {
                dequantized = Some(blocks.dequantize(xs.device())?.to_dtype(xs.dtype())?);
            }
            let w = dequantized.clone().expect("set above");
            candle_nn::Linear::new(w, None).forward(&x)?
        } else {
            weight.forward(&x)?
        });
    }
    Ok(match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => Tensor::cat(&parts, row_dim)?,
    })
}

/// `x: (.., in)` through the 4-bit kernel, in f32.
fn packed_forward(weight: &QMatrix, x: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let in_features = dims.pop().unwrap_or(0);
    let rows = dims.iter().product();
    if in_features != weight.in_features() {
        return Err(crate::Error::invalid(
            "input",
            format!(
                "a linear layer over {} features got {in_features}",
                weight.in_features()
            ),
        ));
    }
    // Contiguous f32 input (every layer's but the embeddings') is read where it lies.
    let (storage, layout) = x.storage_and_layout();
    let y = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((a, b))) => weight.matmul(&values[a..b], rows),
        _ => {
            drop(storage);
            let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            weight.matmul(&values, rows)
        }
    };
    dims.push(weight.out_features());
    Ok(Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())?)
}

/// Projections of one input (q/k/v; gate/up): separate, or one matmul whose output is
/// split. Quantized weights alike are stacked into one matrix (biases concatenated):
/// the activations are then quantized once and the worker pool woken once, which is
/// most of a decode step's overhead.
#[derive(Debug, Clone)]
enum Projections {
    Fused { linear: Linear, sizes: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let mut biases = vec![];
        let mut blocks = vec![];
        let mut q4 = vec![];
        for part in &parts {
            match part {
                Linear::Quantized {
                    blocks: b, bias, ..
                } => {
                    blocks.push(b.as_ref());
                    biases.push(bias.clone());
                }
                Linear::Packed { weight, bias } => {
                    q4.push(weight.as_ref());
                    biases.push(bias.clone());
                }
                Linear::Dense(_) => return Ok(Self::Separate(parts)),
            }
        }
        let bias = match biases.iter().all(Option::is_some) {
            true => Some(Tensor::cat(
                &biases.into_iter().flatten().collect::<Vec<_>>(),
                0,
            )?),
            false if biases.iter().all(Option::is_none) => None,
            false => return Ok(Self::Separate(parts)),
        };
        let stacked = if q4.len() == parts.len() {
            QMatrix::stack(&q4).map(|weight| Linear::Packed {
                weight: Arc::new(weight),
                bias,
            })
        } else if blocks.len() == parts.len() {
            match crate::loader::gguf::concat_rows(&blocks)? {
                Some(stacked) => Some(Linear::quantized(stacked, bias)?),
                None => None,
            }
        } else {
            None
        };
        Ok(match stacked {
            Some(linear) => Self::Fused {
                sizes: parts.iter().map(Linear::out_features).collect(),
                linear,
            },
            None => Self::Separate(parts),
        })
    }
    fn cost(&self) -> LinearCost {
        match self {
            Self::Separate(parts) => parts.iter().map(Linear::cost).sum(),
            Self::Fused { linear, .. } => linear.cost(),
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Self::Separate(parts) => parts.iter_mut().collect(),
            Self::Fused { linear, .. } => vec![linear],
        }
    }

    /// One matrix that a checkpoint already stores fused (Phi-3's `qkv_proj`).
    fn split(linear: Linear, sizes: Vec<usize>) -> Self {
        Self::Fused { linear, sizes }
    }

    /// `xs: (.., in)` to one `(.., out_k)` tensor per projection.
    fn forward(&self, xs: &Tensor, segments: &[usize]) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|p| p.forward(xs, segments)).collect(),
            Self::Fused { linear, sizes } => {
                let ys = linear.forward(xs, segments)?;
                let mut start = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &n in sizes {
                    out.push(ys.narrow(D::Minus1, start, n)?);
                    start += n;
                }
                Ok(out)
            }
        }
    }
}

fn linear(vb: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let bias = if bias {
        Some(vb.get([out_dim], "bias")?)
    } else {
        None
    };
    if let Some(q) = vb.get_quantized([out_dim, in_dim], "weight")? {
        return Linear::quantized(q, bias);
    }
    let weight = vb.get([out_dim, in_dim], "weight")?;
    Ok(Linear::Dense(candle_nn::Linear::new(weight, bias)))
}

/// RMSNorm; Gemma's `x / rms(x) * (1 + w)` keeps `1 + w`.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: &Weights, size: usize, cfg: &Config) -> Result<Self> {
        let weight = vb.get([size], "weight")?;
        let weight = match cfg.block.norm {
            Norm::Rms => weight,
            Norm::RmsPlusOne => (weight + 1.0)?,
        };
        Ok(Self {
            weight,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(out) = rms_norm_cpu(xs, &self.weight, self.eps)? {
            return Ok(out);
        }
        Ok(candle_nn::ops::rms_norm(xs, &self.weight, self.eps)?)
    }
}

/// candle's RMSNorm over contiguous f32 CPU rows, computed as candle computes it (each
/// row's sum of squares added in order, then `x / rms * w`), so the result is the
/// same to the bit; `None` for anything else. Up to eight rows are summed side by
/// side: one row's sum is a chain of dependent adds, eight rows' sums are eight.
fn rms_norm_cpu(xs: &Tensor, weight: &Tensor, eps: f32) -> Result<Option<Tensor>> {
    const ROWS: usize = 8;
    let n = xs.dim(D::Minus1)?;
    if n == 0 || !xs.device().is_cpu() || weight.dims() != [n] {
        return Ok(None);
    }
    let ((xs_s, xs_l), (w_s, w_l)) = (xs.storage_and_layout(), weight.storage_and_layout());
    let (Storage::Cpu(CpuStorage::F32(x)), Storage::Cpu(CpuStorage::F32(w))) = (&*xs_s, &*w_s)
    else {
        return Ok(None);
    };
    let (Some((x0, x1)), Some((w0, w1))) = (xs_l.contiguous_offsets(), w_l.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (x, w) = (&x[x0..x1], &w[w0..w1]);
    let mut out = Vec::with_capacity(x.len());
    for group in x.chunks(ROWS * n) {
        let mut sums = [0f32; ROWS];
        match group.len() / n {
            1 => sums[..1].copy_from_slice(&sums_of_squares::<1>(group, n)),
            2 => sums[..2].copy_from_slice(&sums_of_squares::<2>(group, n)),
            3 => sums[..3].copy_from_slice(&sums_of_squares::<3>(group, n)),
            4 => sums[..4].copy_from_slice(&sums_of_squares::<4>(group, n)),
            5 => sums[..5].copy_from_slice(&sums_of_squares::<5>(group, n)),
            6 => sums[..6].copy_from_slice(&sums_of_squares::<6>(group, n)),
            7 => sums[..7].copy_from_slice(&sums_of_squares::<7>(group, n)),
            _ => sums = sums_of_squares::<ROWS>(group, n),
        }
        for (sum, row) in sums.iter().zip(group.chunks_exact(n)) {
            let rms = (sum / n as f32 + eps).sqrt();
            out.extend(row.iter().zip(w).map(|(&v, &w)| v / rms * w));
        }
    }
    drop((xs_s, w_s));
    Ok(Some(Tensor::from_vec(out, xs.shape(), xs.device())?))
}

/// Each of the `R` rows of `group` (`R × n`)'s sum of squares, added in order; the rows'
/// sums are independent chains, kept in registers with `R` known here.
#[inline(always)]
fn sums_of_squares<const R: usize>(group: &[f32], n: usize) -> [f32; R] {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &group[r * n..][..n]);
    let mut sums = [0f32; R];
    // Column by column across the rows, which an iterator over one row cannot say.
    #[allow(clippy::needless_range_loop)]
    for c in 0..n {
        for r in 0..R {
            let v = rows[r][c];
            sums[r] += v * v;
        }
    }
    sums
}

#[derive(Debug, Clone)]
struct Mlp {
    /// `gate_proj` and `up_proj`, or Phi-3's `gate_up_proj`.
    gate_up: Projections,
    down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    fn load(vb: &Weights, cfg: &Config) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.block.mlp_bias);
        let gate_up = if cfg.block.fused_gate_up {
            Projections::split(linear(&vb.pp("gate_up_proj"), h, 2 * i, bias)?, vec![i, i])
        } else {
            Projections::new(vec![
                linear(&vb.pp("gate_proj"), h, i, bias)?,
                linear(&vb.pp("up_proj"), h, i, bias)?,
            ])?
        };
        Ok(Self {
            gate_up,
            down_proj: linear(&vb.pp("down_proj"), i, h, bias)?,
            activation: cfg.block.activation,
        })
    }

    fn forward(&self, xs: &Tensor, segments: &[usize]) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = self
            .gate_up
            .forward(xs, segments)?
            .try_into()
            .expect("two projections");
        self.down_proj
            .forward(&gated(&gate, &up, self.activation)?, segments)
    }
}

/// `act(gate) * up` for `gate`, `up: (1, rows, intermediate)`. On the CPU in f32, SiLU
/// runs as one vectorised pass over both (rows split across candle's workers when
/// there are many); candle's ops elsewhere.
fn gated(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    if activation == Activation::Silu {
        if let Some(out) = silu_mul_cpu(gate, up)? {
            return Ok(out);
        }
    }
    let gate = match activation {
        Activation::Silu => candle_nn::ops::silu(gate)?,
        Activation::GeluTanh => gate.gelu()?,
    };
    Ok((gate * up)?)
}

/// `silu(gate) * up` over f32 CPU rows with unit inner stride; `None` for anything else.
fn silu_mul_cpu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    /// Values per unit of parallel work (whole rows): a batch-8 decode step's 8 rows
    /// of 1536 split evenly across two threads.
    const VALUES_PER_ITEM: usize = 2048;
    /// Below this many values one thread does all: waking the workers costs more.
    const PARALLEL_FROM: usize = 8192;
    let (one, rows, n) = gate.dims3()?;
    if one != 1 || n == 0 || up.dims() != gate.dims() || !gate.device().is_cpu() {
        return Ok(None);
    }
    let ((gs, gl), (us, ul)) = (gate.storage_and_layout(), up.storage_and_layout());
    let (Storage::Cpu(CpuStorage::F32(g)), Storage::Cpu(CpuStorage::F32(u))) = (&*gs, &*us) else {
        return Ok(None);
    };
    if gl.stride()[2] != 1 || ul.stride()[2] != 1 {
        return Ok(None);
    }
    let (g_at, u_at) = (
        |r: usize| gl.start_offset() + r * gl.stride()[1],
        |r: usize| ul.start_offset() + r * ul.stride()[1],
    );
    let compute = |r: usize, out: &mut [MaybeUninit<f32>]| {
        for ((o, &x), &y) in out
            .iter_mut()
            .zip(&g[g_at(r)..][..n])
            .zip(&u[u_at(r)..][..n])
        {
            o.write(silu(x) * y);
        }
    };
    let mut out = Vec::with_capacity(rows * n);
    let spare = &mut out.spare_capacity_mut()[..rows * n];
    if rows * n < PARALLEL_FROM {
        spare
            .chunks_exact_mut(n)
            .enumerate()
            .for_each(|(r, o)| compute(r, o));
    } else {
        let per_item = VALUES_PER_ITEM.div_ceil(n);
        let items: Vec<Mutex<&mut [MaybeUninit<f32>]>> =
            spare.chunks_mut(per_item * n).map(Mutex::new).collect();
        crate::parallel::execute_chunked(items.len(), |range| {
            for i in range {
                // Each item is handed out once: the lock is never contended.
                let mut part = items[i].lock().unwrap_or_else(|e| e.into_inner());
                for (k, o) in part.chunks_exact_mut(n).enumerate() {
                    compute(i * per_item + k, o);
                }
            }
        });
    }
    // SAFETY: the rows above wrote every one of the `rows * n` values.
    unsafe { out.set_len(rows * n) };
    Ok(Some(Tensor::from_vec(out, (1, rows, n), gate.device())?))
}

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj` and `v_proj`, or Phi-3's `qkv_proj`.
    qkv: Projections,
    o_proj: Linear,
    /// Qwen3 and Gemma 3: RMSNorm over each head's `head_dim`, before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: &Weights, cfg: &Config) -> Result<Self> {
        let (h, d, b) = (cfg.hidden_size, cfg.head_dim, &cfg.block);
        let (n_q, n_kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let qkv = if b.fused_qkv {
            let sizes = vec![n_q * d, n_kv * d, n_kv * d];
            let out = sizes.iter().sum();
            Projections::split(linear(&vb.pp("qkv_proj"), h, out, b.qkv_bias)?, sizes)
        } else {
            Projections::new(vec![
                linear(&vb.pp("q_proj"), h, n_q * d, b.qkv_bias)?,
                linear(&vb.pp("k_proj"), h, n_kv * d, b.qkv_bias)?,
                linear(&vb.pp("v_proj"), h, n_kv * d, b.qkv_bias)?,
            ])?
        };
        let qk_norm = match b.qk_norm {
            true => Some((
                RmsNorm::load(&vb.pp("q_norm"), d, cfg)?,
                RmsNorm::load(&vb.pp("k_norm"), d, cfg)?,
            )),
            false => None,
        };
        Ok(Self {
            qkv,
            o_proj: linear(&vb.pp("o_proj"), n_q * d, h, b.o_bias)?,
            qk_norm,
            num_heads: n_q,
            num_kv_heads: n_kv,
            head_dim: d,
        })
    }

    /// `xs: (1, rows, hidden)`: the new rows of each sequence of `seqs`, one after the
    /// other. Projections run over all rows at once, attention over each sequence's own
    /// cache in one ragged call.
    fn forward(
        &self,
        xs: &Tensor,
        seqs: &mut [LayerStep<'_, '_>],
        segments: &[usize],
    ) -> Result<Tensor> {
        let heads = |ys: &Tensor, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let (b_sz, seq_len, _) = ys.dims3()?;
            let ys = ys.reshape((b_sz, seq_len, n, self.head_dim))?;
            let ys = match norm {
                Some(norm) => norm.forward(&ys)?,
                None => ys,
            };
            Ok(ys.transpose(1, 2)?)
        };
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(xs, segments)?
            .try_into()
            .expect("three projections");
        let (q_norm, k_norm) = match &self.qk_norm {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        // Split into heads once for all sequences, then each sequence is one narrow of
        // the row axis: a decode step of 8 sequences ran ~10 tensor ops per sequence and
        // layer here (a few % of the step, all on the calling thread).
        let q = heads(&q, self.num_heads, q_norm)?;
        let k = heads(&k, self.num_kv_heads, k_norm)?;
        let v = heads(&v, self.num_kv_heads, None)?;
        let mut calls = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for seq in seqs.iter_mut() {
            let rows = seq.rows;
            let part = |t: &Tensor| -> Result<Tensor> {
                Ok(match segments.len() {
                    1 => t.clone(),
                    _ => t.narrow(2, start, rows)?,
                })
            };
            let q = part(&q)?;
            let (k, v) = seq.cache.append(&part(&k)?, &part(&v)?)?;
            calls.push(Ragged {
                q,
                k,
                v,
                positions: seq.positions,
                params: seq.params,
            });
            start += rows;
        }
        let ys = run_attention_ragged(&calls)?;
        self.o_proj.forward(&ys, segments)
    }
}

/// One sequence's share of a layer in a batched call.
struct LayerStep<'c, 'p> {
    rows: usize,
    cache: &'c mut LayerCache,
    positions: &'p Positions<'p>,
    params: &'p AttentionParams,
}

/// Pre-norm (`input_layernorm`, then `post_attention_layernorm` before the MLP), or
/// Gemma's sandwich, which also norms each sublayer's output before its residual add.
#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    /// Gemma: `pre_feedforward_layernorm` and `post_feedforward_layernorm`.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    /// Index into the call's per-kind attention settings.
    kind: usize,
}

impl DecoderLayer {
    fn load(vb: &Weights, cfg: &Config, layer: usize) -> Result<Self> {
        let norm = |name: &str| RmsNorm::load(&vb.pp(name), cfg.hidden_size, cfg);
        let feedforward_norms = match cfg.block.sandwich_norms {
            true => Some((
                norm("pre_feedforward_layernorm")?,
                norm("post_feedforward_layernorm")?,
            )),
            false => None,
        };
        Ok(Self {
            self_attn: Attention::load(&vb.pp("self_attn"), cfg)?,
            mlp: Mlp::load(&vb.pp("mlp"), cfg)?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            feedforward_norms,
            kind: cfg.layer_kinds[layer],
        })
    }

    /// The linear layers in the order a forward pass runs them.
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = self.self_attn.qkv.linears_mut();
        out.push(&mut self.self_attn.o_proj);
        out.extend(self.mlp.gate_up.linears_mut());
        out.push(&mut self.mlp.down_proj);
        out
    }

    fn forward(
        &self,
        xs: &Tensor,
        seqs: &mut [LayerStep<'_, '_>],
        segments: &[usize],
    ) -> Result<Tensor> {
        let residual = xs;
        let h = self.input_layernorm.forward(xs)?;
        let h = self.self_attn.forward(&h, seqs, segments)?;
        match &self.feedforward_norms {
            None => {
                let xs = (h + residual)?;
                let ys = self
                    .mlp
                    .forward(&self.post_attention_layernorm.forward(&xs)?, segments)?;
                Ok((ys + xs)?)
            }
            Some((pre, post)) => {
                let xs = (self.post_attention_layernorm.forward(&h)? + residual)?;
                let ys = self.mlp.forward(&pre.forward(&xs)?, segments)?;
                Ok((post.forward(&ys)? + xs)?)
            }
        }
    }
}

/// Which positions [`Decoder::forward`] computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every input position: `(batch, seq, vocab)`.
    All,
    /// Only the last position, which is all decoding needs: `(batch, 1, vocab)`.
    Last,
    /// Input rows `r ..` (clamped to the last row): `(batch, seq - r, vocab)`.
    From(usize),
}

/// How [`Decoder::forward_batch_with`] lays a batch out on the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchLayout {
    /// Halves where they pay, else together: on two threads, with every linear layer
    /// on our packed kernel and fused attention, for decode steps of at least 6
    /// sequences.
    #[default]
    Auto,
    /// Every sequence in one pass, each matmul and attention call shared by all the
    /// threads of candle's pool.
    Together,
    /// The first and the second half of the sequences side by side, each pass on a
    /// thread of its own: the weights are read once per half, but neither thread
    /// waits for the other's serial parts (norms, quantizing activations, the cache).
    /// Our kernels stay on their half's thread; candle's own ops, where a model needs
    /// them, take turns on candle's pool.
    Halves,
}

/// `*ForCausalLM`: embeddings, the decoder layers, the final norm and the LM head.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// The rotary embedding of each kind of layer (`Config::attention_kinds`).
    ropes: Vec<RotaryEmbedding>,
    /// Embeddings for per-call RoPE overrides, by kind, kept so that decoding with one
    /// does not rebuild its cos/sin table every step.
    rope_overrides: Arc<Mutex<Vec<(usize, RopeScaling, RotaryEmbedding)>>>,
    /// Whether every linear layer runs on our packed kernel (see [`BatchLayout::Auto`]).
    all_packed: bool,
    cfg: Config,
}

/// Distinct per-call RoPE overrides kept per model; the oldest is dropped first.
const ROPE_OVERRIDES_KEPT: usize = 4;

impl Decoder {
    pub fn load(vb: &Weights, cfg: &Config) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed_weight = vb_m
            .pp("embed_tokens")
            .get([cfg.vocab_size, cfg.hidden_size], "weight")?;
        let mut lm_head = if cfg.tie_word_embeddings {
            let shape = [cfg.vocab_size, cfg.hidden_size];
            match vb_m.pp("embed_tokens").get_quantized(shape, "weight")? {
                Some(q) => Linear::quantized(q, None)?,
                None => Linear::Dense(candle_nn::Linear::new(embed_weight.clone(), None)),
            }
        } else {
            linear(&vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        let mut layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(&vb_m.pp("layers").pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let mut packed: Vec<&mut QMatrix> = layers
            .iter_mut()
            .flat_map(DecoderLayer::linears_mut)
            .chain([&mut lm_head])
            .filter_map(Linear::packed_mut)
            .collect();
        QMatrix::share_huge_pages(&mut packed);
        let all_packed = layers
            .iter_mut()
            .flat_map(DecoderLayer::linears_mut)
            .chain([&mut lm_head])
            .all(|l| matches!(l, Linear::Packed { .. }));
        Ok(Self {
            embed_tokens: Embedding::new(embed_weight, cfg.hidden_size),
            layers,
            norm: RmsNorm::load(&vb_m.pp("norm"), cfg.hidden_size, cfg)?,
            lm_head,
            ropes: cfg
                .attention_kinds
                .iter()
                .map(|k| RotaryEmbedding::new(&k.rope))
                .collect(),
            rope_overrides: Arc::default(),
            all_packed,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Whether its linear layers run on quantized blocks.
    pub fn is_quantized(&self) -> bool {
        self.layers
            .iter()
            .any(|layer| layer.mlp.down_proj.is_quantized())
    }

    /// The linear layers' cost per token, the LM head's included; the embedding lookup
    /// (one row) is not.
    pub fn linear_cost(&self) -> LinearCost {
        let layers: LinearCost = self
            .layers
            .iter()
            .map(|l| {
                l.self_attn.qkv.cost()
                    + l.self_attn.o_proj.cost()
                    + l.mlp.gate_up.cost()
                    + l.mlp.down_proj.cost()
            })
            .sum();
        layers + self.lm_head.cost()
    }

    /// The rotary embedding of layers of `kind` under `scaling`, or their own for `None`.
    pub fn rope_for(&self, kind: usize, scaling: Option<&RopeScaling>) -> Cow<'_, RotaryEmbedding> {
        let Some(scaling) = scaling else {
            return Cow::Borrowed(&self.ropes[kind]);
        };
        let mut kept = self
            .rope_overrides
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, rope)) = kept.iter().find(|(k, s, _)| *k == kind && s == scaling) {
            return Cow::Owned(rope.clone());
        }
        let own = &self.cfg.attention_kinds[kind].rope;
        let rope = RotaryEmbedding::with_params(own.rotary_dim, own.theta, Some(scaling));
        if kept.len() == ROPE_OVERRIDES_KEPT {
            kept.remove(0);
        }
        kept.push((kind, scaling.clone(), rope.clone()));
        Cow::Owned(rope)
    }

    /// The attention settings of layers of `kind` in a call made with `call`: the
    /// block's scale and soft-cap, the kind's window, and SelfExtend and the per-call
    /// RoPE scaling only where the kind extends (see [`Config::extends`]).
    pub fn layer_params(&self, kind: usize, call: &AttentionParams) -> AttentionParams {
        let extends = self.cfg.extends(kind);
        AttentionParams {
            scale: self.cfg.block.attention_scale,
            self_extend: call.self_extend.filter(|_| extends),
            sliding_window: self.cfg.attention_kinds[kind].sliding_window,
            softcap: self.cfg.block.attn_logit_softcap,
            rope_scaling: call.rope_scaling.clone().filter(|_| extends),
            ..call.clone()
        }
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    pub fn device(&self) -> &candle_core::Device {
        self.embed_tokens.embeddings().device()
    }

    /// A cache with room for `reserve` positions before it grows, storing keys and
    /// values in the compute dtype ([`crate::Model::new_cache`] follows the model's
    /// choice).
    pub fn new_cache(&self, reserve: usize) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, reserve, None)
    }

    /// Runs `ids` at positions `cache.len() ..`, appends them to `cache`, and returns
    /// f32 logits of the rows `logits_for` selects, `(1, rows, vocab)`.
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        params: &AttentionParams,
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        self.forward_checked(ids, cache, params, logits_for, &mut || Ok(()))
    }

    /// [`Decoder::forward`], calling `between_layers` after each layer; an error from it
    /// (an interrupt) abandons the call. The cache then holds this call's positions
    /// for some layers only, so it must be discarded.
    pub fn forward_checked(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        params: &AttentionParams,
        logits_for: LogitsFor,
        between_layers: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let mut step = [SequenceStep {
            ids,
            cache,
            params,
            logits_for,
        }];
        let logits = self.forward_batch(&mut step, between_layers)?;
        Ok(logits
            .into_iter()
            .next()
            .expect("one sequence")
            .unsqueeze(0)?)
    }

    /// Runs several sequences in one pass: embeddings, norms and every linear layer
    /// over all their new rows at once (one matmul for the batch), attention per
    /// sequence over its own cache, with its own positions and settings (sequences with
    /// different SelfExtend or RoPE settings share a call). Returns, per sequence, the
    /// f32 logits of the rows its `logits_for` selects, `(rows, vocab)`.
    ///
    /// Each sequence gets the logits it would get alone: attention never mixes
    /// sequences, and a quantized layer picks its matmul per sequence. The layout is
    /// [`BatchLayout::Auto`].
    pub fn forward_batch(
        &self,
        steps: &mut [SequenceStep<'_>],
        between_layers: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        self.forward_batch_with(steps, BatchLayout::Auto, between_layers)
    }

    /// [`Decoder::forward_batch`] with the batch laid out on the threads as `layout`
    /// says. Every layout gives the same logits: to the bit where every linear layer is
    /// on our packed kernel, within rounding otherwise (candle's matmuls may sum a row in
    /// another order for another number of rows).
    pub fn forward_batch_with(
        &self,
        steps: &mut [SequenceStep<'_>],
        layout: BatchLayout,
        between_layers: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        if let Some(empty) = steps.iter().position(|s| s.ids.is_empty()) {
            return Err(crate::Error::invalid(
                "ids",
                format!("sequence {empty} of the batch has no tokens"),
            ));
        }
        let halves = match layout {
            BatchLayout::Together => false,
            BatchLayout::Halves => steps.len() >= 2,
            BatchLayout::Auto => self.halves_pay(steps),
        };
        if !halves {
            return self.forward_together(steps, between_layers);
        }
        let (first, second) = steps.split_at_mut(steps.len() / 2);
        // The caller's check runs between the first half's layers; when it (or anything
        // else in that half) fails, the side half stops at its next layer too.
        let stop = AtomicBool::new(false);
        let halves = std::thread::scope(|s| {
            let side = std::thread::Builder::new().spawn_scoped(s, || {
                let mut stopped = || match stop.load(Ordering::Relaxed) {
                    true => Err(crate::Error::Interrupted),
                    false => Ok(()),
                };
                crate::parallel::alone(|| self.forward_together(second, &mut stopped))
            });
            // Without a second thread, the whole batch runs together below.
            let side = side.ok()?;
            let first = crate::parallel::alone(|| self.forward_together(first, between_layers));
            if first.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            // A panic on the side thread goes on here, where the caller can catch it.
            let second = side
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            Some((first, second))
        });
        let Some((first, second)) = halves else {
            return self.forward_together(steps, between_layers);
        };
        let mut out = first?;
        out.extend(second?);
        Ok(out)
    }

    /// [`BatchLayout::Auto`]'s rule: halves on two threads, when every linear layer runs
    /// on our packed kernel, attention on the fused kernel (the others run candle ops,
    /// whose threads the halves would share), and the step decodes at least 6
    /// sequences of one row each.
    ///
    /// On a 2-core AMD EPYC, in medians of alternating rounds, halves ran decode steps
    /// of 8 sequences 5.6-8% faster than together in Rust (through the serving engine
    /// 11-14% in two sets, within the noise in a third), of 6 1-6% faster, and of 4
    /// 2-5% slower (`BENCHMARKS.md`). Not with more threads: each thread would read
    /// all the weights, which two can afford and many cannot.
    fn halves_pay(&self, steps: &[SequenceStep<'_>]) -> bool {
        const FROM_SEQUENCES: usize = 6;
        self.all_packed
            && crate::parallel::threads() == 2
            && steps.len() >= FROM_SEQUENCES
            && steps
                .iter()
                .all(|s| s.ids.len() == 1 && s.params.backend == AttentionBackend::Fused)
    }

    fn forward_together(
        &self,
        steps: &mut [SequenceStep<'_>],
        between_layers: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        let segments: Vec<usize> = steps.iter().map(|s| s.ids.len()).collect();
        let n_kinds = self.cfg.attention_kinds.len();
        // Per sequence and kind of layer: settings, rotary embedding, position tables.
        let params: Vec<Vec<AttentionParams>> = steps
            .iter()
            .map(|s| {
                (0..n_kinds)
                    .map(|k| self.layer_params(k, s.params))
                    .collect()
            })
            .collect();
        let ropes: Vec<Vec<_>> = params
            .iter()
            .map(|kinds| {
                kinds
                    .iter()
                    .enumerate()
                    .map(|(kind, p)| self.rope_for(kind, p.rope_scaling.as_ref()))
                    .collect()
            })
            .collect();
        let sized: Vec<Vec<_>> = steps
            .iter()
            .zip(&ropes)
            .map(|(s, ropes)| {
                let kv_len = s.cache.len() + s.ids.len();
                let length = s.params.rope_length.unwrap_or(kv_len).max(kv_len);
                ropes.iter().map(|r| r.at_length(length)).collect()
            })
            .collect();
        let positions: Vec<Vec<Positions>> = steps
            .iter()
            .zip(&sized)
            .map(|(s, ropes)| {
                let kv_len = s.cache.len() + s.ids.len();
                ropes
                    .iter()
                    .map(|rope| Positions::new(rope, s.ids.len(), kv_len))
                    .collect()
            })
            .collect();

        let ids: Vec<u32> = steps.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let input = Tensor::new(ids.as_slice(), self.device())?.unsqueeze(0)?;
        let mut xs = self.embed_tokens.forward(&input)?;
        if let Some(scale) = self.cfg.block.embedding_scale {
            let scale = rounded_to(scale, xs.dtype());
            xs = (xs * scale)?;
        }
        for (idx, layer) in self.layers.iter().enumerate() {
            let kind = layer.kind;
            let mut seqs: Vec<LayerStep> = steps
                .iter_mut()
                .enumerate()
                .map(|(i, s)| LayerStep {
                    rows: s.ids.len(),
                    cache: s.cache.layer_mut(idx),
                    positions: &positions[i][kind],
                    params: &params[i][kind],
                })
                .collect();
            xs = layer.forward(&xs, &mut seqs, &segments)?;
            between_layers()?;
        }

        // The selected rows of every sequence, through the final norm and the LM head.
        let mut selected = Vec::with_capacity(steps.len());
        let mut start = 0;
        for s in steps.iter() {
            let rows = s.ids.len();
            let first = match s.logits_for {
                LogitsFor::All => 0,
                LogitsFor::Last => rows - 1,
                LogitsFor::From(row) => row.min(rows - 1),
            };
            selected.push((start + first, rows - first));
            start += rows;
        }
        let xs = match selected.as_slice() {
            [(0, n)] if *n == start => xs,
            _ => {
                let parts = selected
                    .iter()
                    .map(|&(s, n)| xs.narrow(1, s, n))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 1)?
            }
        };
        let counts: Vec<usize> = selected.iter().map(|&(_, n)| n).collect();
        let xs = self.norm.forward(&xs)?;
        let logits = self.lm_head.forward(&xs, &counts)?.to_dtype(DType::F32)?;
        debug_assert_eq!(logits.dim(D::Minus1)?, self.cfg.vocab_size);
        let logits = match self.cfg.block.final_logit_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        }
        .squeeze(0)?;
        let mut out = Vec::with_capacity(counts.len());
        let mut start = 0;
        for n in counts {
            out.push(logits.narrow(0, start, n)?);
            start += n;
        }
        Ok(out)
    }
}

/// One sequence's part of a [`Decoder::forward_batch`] call: its new tokens, which
/// sit at positions `cache.len() ..` and are appended to `cache`, its attention
/// settings, and the rows whose logits it wants.
pub struct SequenceStep<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
    pub params: &'a AttentionParams,
    pub logits_for: LogitsFor,
}

/// `x` as the nearest value of `dtype`: `transformers` casts Gemma's embedding scale
/// to the activations' dtype before multiplying.
fn rounded_to(x: f64, dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(x).to_f64(),
        DType::F16 => half::f16::from_f64(x).to_f64(),
        DType::F32 => x as f32 as f64,
        _ => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Our RMSNorm equals candle's to the bit, for full and partial groups of rows.
    #[test]
    fn rms_norm_matches_candle_to_the_bit() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, n) in [(1, 576), (8, 576), (13, 40), (3, 1)] {
            let x = (Tensor::randn(0f32, 3.0, (1, rows, n), &dev)? + 0.5)?;
            let w = Tensor::randn(1f32, 0.2, n, &dev)?;
            let ours = rms_norm_cpu(&x, &w, 1e-5)?.expect("f32 on the CPU");
            let theirs = candle_nn::ops::rms_norm(&x, &w, 1e-5)?;
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            assert_eq!(bits(&ours)?, bits(&theirs)?, "{rows} rows of {n}");
        }
        Ok(())
    }

    /// The vectorised SiLU-and-multiply equals candle's ops, one thread or several,
    /// on the strided halves of one stacked projection as the MLP passes them.
    #[test]
    fn gated_silu_matches_candle() -> Result<()> {
        // One thread; then items of 16 rows, of 2 rows, and of 2 rows with one left over.
        for (rows, n) in [(3, 128), (700, 128), (8, 1536), (7, 1536)] {
            let stacked = (Tensor::randn(0f32, 4.0, (1, rows, 2 * n), &Device::Cpu)? - 1.0)?;
            let (gate, up) = (stacked.narrow(2, 0, n)?, stacked.narrow(2, n, n)?);
            let got = silu_mul_cpu(&gate, &up)?.expect("f32 CPU rows");
            let want = (candle_nn::ops::silu(&gate)? * &up)?;
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-6 * scale, "{rows} rows: {err} of {scale}");
        }
        Ok(())
    }
}
