#![allow(dead_code)]
//! Helpers shared by the integration tests: a deterministic RNG and tiny random models.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use selfextend_core::config::{Block, LayerAttention, RopeConfig};
use selfextend_core::loader::Weights;
use selfextend_core::model::Decoder;
use selfextend_core::{Config, Model, Tokenizer};

/// SplitMix64: small, seedable, and independent of any crate's RNG stream.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-scale, scale)`.
    pub fn uniform(&mut self, scale: f32) -> f32 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((2.0 * u - 1.0) * scale as f64) as f32
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(scale)).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub fn tiny_config(num_kv_heads: usize, tie: bool) -> Config {
    Config {
        model_type: "llama",
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: num_kv_heads,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 16,
        tie_word_embeddings: tie,
        bos_token_id: Some(0),
        eos_token_ids: vec![1],
        block: Block::llama(8),
        attention_kinds: vec![LayerAttention {
            sliding_window: None,
            rope: RopeConfig {
                theta: 10_000.0,
                rotary_dim: 8,
                scaling: None,
            },
        }],
        layer_kinds: vec![0, 0],
    }
}

/// A Gemma-2-like tiny config exercising every block switch: sandwich `1 + w` norms,
/// q/k norms, GELU, embedding scale, an attention scale other than `1/sqrt(d)`,
/// soft-caps, q/k/v biases, partial rotary, and a sliding layer (window 5) between
/// global ones, the local layer with its own RoPE base.
pub fn tiny_mixed_config() -> Config {
    use selfextend_core::config::{Activation, Norm};
    let mut cfg = tiny_config(2, true);
    cfg.model_type = "gemma2";
    cfg.num_hidden_layers = 3;
    cfg.block = Block {
        norm: Norm::RmsPlusOne,
        sandwich_norms: true,
        qkv_bias: true,
        qk_norm: true,
        embedding_scale: Some(2.0),
        activation: Activation::GeluTanh,
        attention_scale: 0.3,
        attn_logit_softcap: Some(4.0),
        final_logit_softcap: Some(6.0),
        ..Block::llama(8)
    };
    let global = LayerAttention {
        sliding_window: None,
        rope: RopeConfig {
            theta: 10_000.0,
            rotary_dim: 4,
            scaling: None,
        },
    };
    let local = LayerAttention {
        sliding_window: Some(5),
        rope: RopeConfig {
            theta: 100.0,
            ..global.rope.clone()
        },
    };
    cfg.attention_kinds = vec![global, local];
    cfg.layer_kinds = vec![0, 1, 0];
    cfg
}

/// Random weights, with q/k scaled up so attention is sharp and positions matter.
pub fn tiny_weights(cfg: &Config, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let mut w = HashMap::new();
    let dev = Device::Cpu;
    let mut put = |name: String, shape: Vec<usize>, scale: f32, rng: &mut Rng| {
        let n = shape.iter().product();
        let t = Tensor::from_vec(rng.vec(n, scale), shape, &dev).unwrap();
        w.insert(name, t);
    };
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    put(
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, h],
        1.0,
        &mut rng,
    );
    if !cfg.tie_word_embeddings {
        put(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, h],
            0.3,
            &mut rng,
        );
    }
    put("model.norm.weight".into(), vec![h], 1.0, &mut rng);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let b = &cfg.block;
        if b.qkv_bias {
            for (name, n) in [("q_proj", nq * d), ("k_proj", nkv * d), ("v_proj", nkv * d)] {
                put(format!("{p}.self_attn.{name}.bias"), vec![n], 0.3, &mut rng);
            }
        }
        if b.qk_norm {
            put(
                format!("{p}.self_attn.q_norm.weight"),
                vec![d],
                1.0,
                &mut rng,
            );
            put(
                format!("{p}.self_attn.k_norm.weight"),
                vec![d],
                1.0,
                &mut rng,
            );
        }
        if b.sandwich_norms {
            for name in ["pre_feedforward_layernorm", "post_feedforward_layernorm"] {
                put(format!("{p}.{name}.weight"), vec![h], 1.0, &mut rng);
            }
        }
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![nq * d, h],
            0.8,
            &mut rng,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![nkv * d, h],
            0.8,
            &mut rng,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![nkv * d, h],
            0.3,
            &mut rng,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, nq * d],
            0.3,
            &mut rng,
        );
        put(
            format!("{p}.mlp.gate_proj.weight"),
            vec![i, h],
            0.3,
            &mut rng,
        );
        put(format!("{p}.mlp.up_proj.weight"), vec![i, h], 0.3, &mut rng);
        put(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, i],
            0.3,
            &mut rng,
        );
        put(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            1.0,
            &mut rng,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            1.0,
            &mut rng,
        );
    }
    w
}

pub fn word_tokenizer(vocab_size: usize) -> Tokenizer {
    let vocab: HashMap<String, u32> = (0..vocab_size as u32)
        .map(|i| (format!("w{i}"), i))
        .collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("w0".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    tok.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    Tokenizer::from_inner(tok)
}

pub fn tiny_model(cfg: &Config, seed: u64) -> Model {
    model_from(&tiny_weights(cfg, seed), cfg)
}

fn model_from(source: &dyn selfextend_core::loader::TensorSource, cfg: &Config) -> Model {
    let weights = Weights::new(source, candle_core::DType::F32, &Device::Cpu);
    let decoder = Decoder::load(&weights, cfg).unwrap();
    Model::from_parts(
        decoder,
        word_tokenizer(cfg.vocab_size),
        PathBuf::from("<memory>"),
    )
}

/// `weights` with every matrix served as Q8_0 blocks, as a quantized GGUF serves them.
pub struct Quantized(pub HashMap<String, Tensor>);

impl selfextend_core::loader::TensorSource for Quantized {
    fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: candle_core::DType,
        device: &Device,
    ) -> selfextend_core::Result<Tensor> {
        self.0.load(name, shape, dtype, device)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    fn load_quantized(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> selfextend_core::Result<Option<candle_core::quantized::QTensor>> {
        if shape.len() != 2 || name.contains("embed_tokens") {
            return Ok(None);
        }
        let dense = self.0.load(name, shape, candle_core::DType::F32, device)?;
        let q = candle_core::quantized::QTensor::quantize(
            &dense,
            candle_core::quantized::GgmlDType::Q8_0,
        )?;
        Ok(Some(q))
    }
}

/// [`tiny_model`] with its linear layers quantized to Q8_0.
pub fn tiny_quantized_model(cfg: &Config, seed: u64) -> Model {
    model_from(&Quantized(tiny_weights(cfg, seed)), cfg)
}

pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
