//! The Llama decoder (Touvron et al., "LLaMA: Open and Efficient Foundation Language
//! Models", 2023), following `transformers`' `modeling_llama.py`, with attention that
//! can apply SelfExtend (Jin et al., ICML 2024).
//!
//! Departures from the reference: the KV cache holds un-rotated keys and RoPE is
//! applied inside attention (see [`crate::kv_cache`]), and logits are always f32.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor, D};
use candle_nn::Embedding;

use crate::attention::{run_attention, AttentionParams, Positions};
use crate::config::{Config, RopeScaling};
use crate::error::Result;
use crate::kv_cache::{KvCache, LayerCache};
use crate::loader::Weights;
use crate::rope::RotaryEmbedding;

/// From this many input rows on, a quantized layer on the CPU dequantizes its weight
/// for the call and runs the dense gemm. `QMatMul` quantizes activations to 8 bits and
/// wins on the few rows of decode, where reading weights is the cost; on prefill
/// chunks the gemm is several times faster, the one-off dequantization is amortised
/// over the rows, and logits are those of the exact dequantized weights.
const DENSE_FROM_ROWS: usize = 32;

/// A linear layer over dense weights (gemm) or quantized GGUF blocks (`QMatMul`).
#[derive(Debug, Clone)]
enum Linear {
    Dense(candle_nn::Linear),
    Quantized {
        weight: QMatMul,
        blocks: Arc<QTensor>,
        bias: Option<Tensor>,
    },
}

impl Linear {
    fn quantized(blocks: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let blocks = Arc::new(blocks);
        Ok(Self::Quantized {
            weight: QMatMul::from_arc(Arc::clone(&blocks))?,
            blocks,
            bias,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(l) => l.forward(xs)?,
            Self::Quantized {
                weight,
                blocks,
                bias,
            } => {
                let rows = xs.elem_count() / xs.dim(D::Minus1)?.max(1);
                let ys = if rows >= DENSE_FROM_ROWS && xs.device().is_cpu() {
                    let dense = blocks.dequantize(xs.device())?.to_dtype(xs.dtype())?;
                    candle_nn::Linear::new(dense, None).forward(xs)?
                } else {
                    weight.forward(xs)?
                };
                match bias {
                    Some(b) => ys.broadcast_add(b)?,
                    None => ys,
                }
            }
        })
    }
}

/// Projections of one input (q/k/v; gate/up). When their weights are quantized alike
/// they run as one stacked matmul: candle then quantizes the activations once and
/// wakes its worker pool once, which is most of a decode step's overhead.
#[derive(Debug, Clone)]
enum Projections {
    Fused { linear: Linear, sizes: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let mut blocks = vec![];
        for part in &parts {
            match part {
                Linear::Quantized {
                    blocks: b,
                    bias: None,
                    ..
                } => blocks.push(b.as_ref()),
                _ => return Ok(Self::Separate(parts)),
            }
        }
        let sizes = blocks.iter().map(|b| b.shape().dims()[0]).collect();
        Ok(match crate::loader::gguf::concat_rows(&blocks)? {
            Some(stacked) => Self::Fused {
                linear: Linear::quantized(stacked, None)?,
                sizes,
            },
            None => Self::Separate(parts),
        })
    }

    /// `xs: (.., in)` to one `(.., out_k)` tensor per projection.
    fn forward(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|p| p.forward(xs)).collect(),
            Self::Fused { linear, sizes } => {
                let ys = linear.forward(xs)?;
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

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: &Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get([size], "weight")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(xs, &self.weight, self.eps)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    /// `gate_proj` and `up_proj`.
    gate_up: Projections,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: &Weights, cfg: &Config) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_up: Projections::new(vec![
                linear(&vb.pp("gate_proj"), h, i, bias)?,
                linear(&vb.pp("up_proj"), h, i, bias)?,
            ])?,
            down_proj: linear(&vb.pp("down_proj"), i, h, bias)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = self
            .gate_up
            .forward(xs)?
            .try_into()
            .expect("two projections");
        self.down_proj
            .forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj` and `v_proj`.
    qkv: Projections,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: &Weights, cfg: &Config) -> Result<Self> {
        let (h, d, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (n_q, n_kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            qkv: Projections::new(vec![
                linear(&vb.pp("q_proj"), h, n_q * d, bias)?,
                linear(&vb.pp("k_proj"), h, n_kv * d, bias)?,
                linear(&vb.pp("v_proj"), h, n_kv * d, bias)?,
            ])?,
            o_proj: linear(&vb.pp("o_proj"), n_q * d, h, bias)?,
            num_heads: n_q,
            num_kv_heads: n_kv,
            head_dim: d,
        })
    }

    /// `xs: (batch, seq, hidden)` at positions `cache.len() .. cache.len() + seq`.
    fn forward(
        &self,
        xs: &Tensor,
        cache: &mut LayerCache,
        positions: &Positions,
        params: &AttentionParams,
    ) -> Result<Tensor> {
        let (b_sz, seq_len, _) = xs.dims3()?;
        let heads = |ys: &Tensor, n: usize| -> Result<Tensor> {
            Ok(ys
                .reshape((b_sz, seq_len, n, self.head_dim))?
                .transpose(1, 2)?)
        };
        let [q, k, v]: [Tensor; 3] = self.qkv.forward(xs)?.try_into().expect("three projections");
        let q = heads(&q, self.num_heads)?;
        let k = heads(&k, self.num_kv_heads)?;
        let v = heads(&v, self.num_kv_heads)?;
        let (k, v) = cache.append(&k, &v)?;
        let ys = run_attention(&q, &k, &v, positions, params)?;
        let ys = ys
            .transpose(1, 2)?
            .reshape((b_sz, seq_len, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&ys)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(vb: &Weights, cfg: &Config) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(&vb.pp("self_attn"), cfg)?,
            mlp: Mlp::load(&vb.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::load(
                &vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                &vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cache: &mut LayerCache,
        positions: &Positions,
        params: &AttentionParams,
    ) -> Result<Tensor> {
        let residual = xs;
        let xs = self.input_layernorm.forward(xs)?;
        let xs = (self.self_attn.forward(&xs, cache, positions, params)? + residual)?;
        let residual = &xs;
        let ys = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        Ok((ys + residual)?)
    }
}

/// Which positions [`Llama::forward`] computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every input position: `(batch, seq, vocab)`.
    All,
    /// Only the last position, which is all decoding needs: `(batch, 1, vocab)`.
    Last,
    /// Input rows `r ..` (clamped to the last row): `(batch, seq - r, vocab)`.
    From(usize),
}

/// `LlamaForCausalLM`.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    /// Embeddings for per-call RoPE overrides, kept so that decoding with one does not
    /// rebuild its cos/sin table every step.
    rope_overrides: Arc<Mutex<Vec<(RopeScaling, RotaryEmbedding)>>>,
    cfg: Config,
}

/// Distinct per-call RoPE overrides kept per model; the oldest is dropped first.
const ROPE_OVERRIDES_KEPT: usize = 4;

impl Llama {
    pub fn load(vb: &Weights, cfg: &Config) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed_weight = vb_m
            .pp("embed_tokens")
            .get([cfg.vocab_size, cfg.hidden_size], "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            let shape = [cfg.vocab_size, cfg.hidden_size];
            match vb_m.pp("embed_tokens").get_quantized(shape, "weight")? {
                Some(q) => Linear::quantized(q, None)?,
                None => Linear::Dense(candle_nn::Linear::new(embed_weight.clone(), None)),
            }
        } else {
            linear(&vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(&vb_m.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: Embedding::new(embed_weight, cfg.hidden_size),
            layers,
            norm: RmsNorm::load(&vb_m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            lm_head,
            rope: RotaryEmbedding::new(cfg),
            rope_overrides: Arc::default(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The rotary embedding for `scaling`, or the model's own for `None`.
    pub fn rope_for(&self, scaling: Option<RopeScaling>) -> Cow<'_, RotaryEmbedding> {
        let Some(scaling) = scaling else {
            return Cow::Borrowed(&self.rope);
        };
        let mut kept = self
            .rope_overrides
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, rope)) = kept.iter().find(|(s, _)| *s == scaling) {
            return Cow::Owned(rope.clone());
        }
        let rope =
            RotaryEmbedding::with_params(self.cfg.head_dim, self.cfg.rope_theta, Some(&scaling));
        if kept.len() == ROPE_OVERRIDES_KEPT {
            kept.remove(0);
        }
        kept.push((scaling, rope.clone()));
        Cow::Owned(rope)
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    pub fn device(&self) -> &candle_core::Device {
        self.embed_tokens.embeddings().device()
    }

    /// A cache for this model with room for `reserve` positions before it grows.
    pub fn new_cache(&self, reserve: usize) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, reserve)
    }

    /// Runs `input_ids: (batch, seq)` (u32) at positions `cache.len() ..`, appends
    /// them to `cache`, and returns f32 logits, `(batch, seq | 1, vocab)`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        params: &AttentionParams,
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        self.forward_checked(input_ids, cache, params, logits_for, &mut || Ok(()))
    }

    /// [`Llama::forward`], calling `between_layers` after each layer; an error from it
    /// (an interrupt) abandons the call. The cache then holds this call's positions
    /// for some layers only, so it must be discarded.
    pub fn forward_checked(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        params: &AttentionParams,
        logits_for: LogitsFor,
        between_layers: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let kv_len = cache.len() + seq_len;
        let rope = self.rope_for(params.rope_scaling);
        let rope = rope.at_length(params.rope_length.unwrap_or(kv_len).max(kv_len));
        let positions = Positions::new(&rope, seq_len, kv_len);
        let mut xs = self.embed_tokens.forward(input_ids)?;
        for (idx, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, cache.layer_mut(idx), &positions, params)?;
            between_layers()?;
        }
        let first = match logits_for {
            LogitsFor::All => 0,
            LogitsFor::Last => seq_len - 1,
            LogitsFor::From(row) => row.min(seq_len - 1),
        };
        if first > 0 {
            xs = xs.narrow(1, first, seq_len - first)?;
        }
        let xs = self.norm.forward(&xs)?;
        let logits = self.lm_head.forward(&xs)?;
        debug_assert_eq!(logits.dim(D::Minus1)?, self.cfg.vocab_size);
        Ok(logits.to_dtype(DType::F32)?)
    }
}
