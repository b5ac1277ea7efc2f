//! Causal attention with optional SelfExtend (Jin et al., "LLM Maybe LongLM: Self-Extend
//! LLM Context Window Without Tuning", ICML 2024), behind one dispatch point.
//!
//! A query at position `i` attends to a key at position `j <= i` with
//! - neighbor positions `(i, j)` when `i - j < W`,
//! - grouped positions `(i / G + W - W / G, j / G)` otherwise,
//!
//! and one f32 softmax spans both kinds of score. Keys arrive un-rotated (see
//! [`crate::kv_cache`]), so each backend rotates queries and keys to whichever
//! positions it needs.
//!
//! Every backend also masks keys outside a layer's sliding window (`i - j >= window`)
//! and soft-caps scores (`cap * tanh(s / cap)`, Gemma 2) when the layer asks for it.
//!
//! **SelfExtend on sliding-window layers.** A layer whose window is no longer than the
//! trained context never scores a pair farther apart than the model was trained on, so
//! it keeps plain attention within its window; SelfExtend applies to the global layers
//! (see [`crate::Config::extends`]). A layer that declares a window longer than the
//! trained context is not protected by it: it gets SelfExtend, still masked by the
//! window.

#[cfg(feature = "cuda")]
mod cuda;
mod fused;
mod naive;
mod tiled;

use std::cell::OnceCell;

use candle_core::Tensor;

use crate::config::RopeScaling;
use crate::error::{Error, Result};
use crate::rope::RotaryEmbedding;

/// SelfExtend's two knobs: the group size `G` and the neighbor window `W`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SelfExtend {
    group_size: usize,
    window: usize,
}

impl SelfExtend {
    pub fn new(group_size: usize, window: usize) -> Result<Self> {
        if group_size < 1 {
            return Err(Error::invalid(
                "group_size",
                format!("must be >= 1, got {group_size}"),
            ));
        }
        if window < 1 {
            return Err(Error::invalid(
                "window",
                format!("must be >= 1, got {window}"),
            ));
        }
        Ok(Self { group_size, window })
    }

    /// Picks `(G, W)` so a model trained on `trained_context` tokens reads
    /// `target_length` tokens, following the paper's guidance:
    ///
    /// 1. `W = L / 4`, rounded down to a multiple of 64 once `L >= 256`. The authors
    ///    use windows of 512 to 1536 for 4k-context Llama-2, 1/8 to 3/8 of `L`;
    ///    a quarter is the middle of that range.
    /// 2. `G` is the smallest group size that keeps every grouped query position,
    ///    `(target - 1) / G + W - W / G`, at or below `2L / 3`: the model then only
    ///    sees positions well inside the range it was trained on.
    /// 3. That implies `(L - W) * G + W >= target`, the coverage rule.
    ///
    /// A target within `2L / 3` gets `G = 1`, which is exactly plain attention.
    pub fn auto(target_length: usize, trained_context: usize) -> Result<Self> {
        if target_length < 1 {
            return Err(Error::invalid("target_length", "must be >= 1"));
        }
        if trained_context < 4 {
            return Err(Error::invalid(
                "trained_context",
                format!("must be >= 4, got {trained_context}"),
            ));
        }
        let l = trained_context;
        let window = if l >= 256 {
            (l / 4) / 64 * 64
        } else {
            (l / 4).max(1)
        };
        let limit = 2 * l / 3;
        let fits = |g: usize| (target_length - 1) / g + window - window / g <= limit;
        // The grouped position is at least (target - W) / g + W - 1, so no g below
        // `first` fits; above W it is (target - 1) / g + W, which first fits at the g
        // returned by the closed form. Between them a short scan, whatever the target.
        let spare = limit - window + 1;
        let first = (target_length.saturating_sub(window) / spare).max(1);
        let group_size = (first..=window)
            .find(|&g| fits(g))
            .unwrap_or(((target_length - 1) / spare + 1).max(window + 1));
        Self::new(group_size, window)
    }

    pub fn group_size(&self) -> usize {
        self.group_size
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// The paper's estimate of the context reachable from `trained_context` tokens,
    /// `(L - W) * G + W`, never less than `L` itself: at lengths up to `L` no relative
    /// position exceeds what the model was trained on, whatever `W` is.
    pub fn max_context(&self, trained_context: usize) -> usize {
        let l = trained_context as u128;
        let (g, w) = (self.group_size as u128, self.window as u128);
        let extended = if l > w { (l - w) * g + w } else { l };
        extended.min(usize::MAX as u128) as usize
    }

    /// The rotary position of a query at absolute position `i` when scoring grouped keys.
    pub fn grouped_query_position(&self, i: usize) -> usize {
        i / self.group_size + self.window - self.window / self.group_size
    }

    /// The rotary position of a key at absolute position `j` when scored as grouped.
    pub fn grouped_key_position(&self, j: usize) -> usize {
        j / self.group_size
    }

    /// Whether the pair `(i, j)`, `j <= i`, uses neighbor (ordinary) positions.
    pub fn is_neighbor(&self, i: usize, j: usize) -> bool {
        i - j < self.window
    }
}

/// Which implementation computes the attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionBackend {
    /// Materialises the `(q_len, kv_len)` score matrices with candle ops. Simple enough
    /// to trust, and kept as the oracle for every faster backend. Runs on any device.
    Naive,
    /// Candle ops over blocks of at most `query_block` query rows (fewer when the
    /// context is long): `O(block * kv_len)` memory, on any device.
    Tiled { query_block: usize },
    /// One fused kernel with an online softmax, `O(tile)` memory and about one
    /// attention's work with SelfExtend on: the tiled CPU kernel, or with the `cuda`
    /// feature a CUDA kernel for prefill chunks (decode's single rows keep the tiled
    /// path there). Runs as [`Self::TILED`] where neither applies.
    #[default]
    Fused,
}

impl AttentionBackend {
    /// The tiled backend with its default block of query rows.
    pub const TILED: Self = Self::Tiled {
        query_block: tiled::QUERY_BLOCK,
    };

    /// The name `parse_attention` reads: "naive", "tiled" or "fused".
    pub fn name(&self) -> &'static str {
        match self {
            Self::Naive => "naive",
            Self::Tiled { .. } => "tiled",
            Self::Fused => "fused",
        }
    }

    /// The fastest backend for `device`: the fused kernels on the CPU and on CUDA (on
    /// an H200 the CUDA one prefilled 32k tokens 2.4 times as fast as the tiled
    /// backend; BENCHMARKS.md), the tiled candle-ops version elsewhere (Metal).
    pub fn for_device(device: &candle_core::Device) -> Self {
        if device.is_cpu() || device.is_cuda() {
            Self::Fused
        } else {
            Self::TILED
        }
    }

    /// Query rows one block of [`Self::Tiled`] scores at once for `kv_len` keys.
    pub fn tiled_rows(query_block: usize, n_heads: usize, kv_len: usize) -> usize {
        tiled::block_rows(query_block, n_heads, kv_len)
    }
}

/// Everything that varies between attention calls (and between the kinds of layer of
/// one model).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionParams {
    /// Multiplies `q . k`; `1 / sqrt(head_dim)` for Llama.
    pub scale: f64,
    /// `None` is ordinary causal attention.
    pub self_extend: Option<SelfExtend>,
    /// Keys at distance `window` or more from the query are masked.
    pub sliding_window: Option<usize>,
    /// Scores (after `scale`) become `cap * tanh(score / cap)`.
    pub softcap: Option<f64>,
    pub backend: AttentionBackend,
    /// Replaces the model's own RoPE scaling (from its config) for this call, on the
    /// layers SelfExtend would apply to.
    pub rope_scaling: Option<RopeScaling>,
    /// The sequence length that length-dependent RoPE scaling (dynamic NTK) is computed
    /// for. `None` is the length of the cache after each forward call; a chunked prefill
    /// sets the length of the whole prompt, so that chunking does not change the result.
    pub rope_length: Option<usize>,
}

impl AttentionParams {
    pub fn new(head_dim: usize, self_extend: Option<SelfExtend>) -> Self {
        Self {
            scale: 1.0 / (head_dim as f64).sqrt(),
            self_extend,
            sliding_window: None,
            softcap: None,
            backend: AttentionBackend::default(),
            rope_scaling: None,
            rope_length: None,
        }
    }
}

/// The positions of one forward call: `q_len` queries at `kv_len - q_len .. kv_len`
/// over keys at `0 .. kv_len`. Rotary tables and masks depend on nothing else (and on
/// the call's one [`AttentionParams`]), so the backends build them once here and every
/// layer reuses them.
pub struct Positions<'a> {
    rope: &'a RotaryEmbedding,
    q_len: usize,
    kv_len: usize,
    naive: OnceCell<naive::Tables>,
    tiled: OnceCell<tiled::Tables>,
    fused: OnceCell<std::sync::Arc<crate::rope::CosSinTable>>,
}

impl<'a> Positions<'a> {
    pub fn new(rope: &'a RotaryEmbedding, q_len: usize, kv_len: usize) -> Self {
        Self {
            rope,
            q_len,
            kv_len,
            naive: OnceCell::new(),
            tiled: OnceCell::new(),
            fused: OnceCell::new(),
        }
    }

    pub fn rope(&self) -> &RotaryEmbedding {
        self.rope
    }

    /// The rotary positions of this call's queries and keys, and with SelfExtend their
    /// grouped positions, when some pair is far enough apart to use them.
    fn rotary_positions(&self, self_extend: Option<SelfExtend>) -> RotaryPositions {
        let q: Vec<usize> = (self.kv_len - self.q_len..self.kv_len).collect();
        let k: Vec<usize> = (0..self.kv_len).collect();
        let grouped = match self_extend {
            Some(se) if self.kv_len > se.window() => Some((
                q.iter().map(|&i| se.grouped_query_position(i)).collect(),
                k.iter().map(|&j| se.grouped_key_position(j)).collect(),
            )),
            _ => None,
        };
        RotaryPositions { q, k, grouped }
    }
}

/// The shape rules of [`run_attention`]'s operands.
fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor, positions: &Positions) -> Result<()> {
    let (b, n_heads, q_len, head_dim) = q.dims4()?;
    let (kb, n_kv_heads, kv_len, kd) = k.dims4()?;
    if kb != b || kd != head_dim || v.dims4()? != (b, n_kv_heads, kv_len, head_dim) {
        return Err(candle_core::Error::Msg(format!(
            "attention shape mismatch: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        ))
        .into());
    }
    if (q_len, kv_len) != (positions.q_len, positions.kv_len) {
        return Err(candle_core::Error::Msg(format!(
            "attention positions are for q_len {} and kv_len {}, got q {:?}, k {:?}",
            positions.q_len,
            positions.kv_len,
            q.dims(),
            k.dims()
        ))
        .into());
    }
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 || q_len > kv_len {
        return Err(candle_core::Error::Msg(format!(
            "attention needs n_heads % n_kv_heads == 0 and q_len <= kv_len, got q {:?}, k {:?}",
            q.dims(),
            k.dims()
        ))
        .into());
    }
    Ok(())
}

/// `cap * tanh(scores / cap)`, or `scores` without a cap.
fn softcap(scores: Tensor, cap: Option<f64>) -> Result<Tensor> {
    Ok(match cap {
        Some(cap) => ((scores / cap)?.tanh()? * cap)?,
        None => scores,
    })
}

/// The value in `cell`, computing it with `init` the first time (one forward call's
/// tables, shared by its layers).
fn cached<T>(cell: &OnceCell<T>, init: impl FnOnce() -> Result<T>) -> Result<&T> {
    if let Some(value) = cell.get() {
        return Ok(value);
    }
    let value = init()?;
    Ok(cell.get_or_init(|| value))
}

struct RotaryPositions {
    q: Vec<usize>,
    k: Vec<usize>,
    grouped: Option<(Vec<usize>, Vec<usize>)>,
}

/// Causal (optionally SelfExtend) attention of a chunk of queries over the whole cache.
///
/// - `q`: `(batch, n_heads, q_len, head_dim)`, un-rotated, at absolute positions
///   `kv_len - q_len .. kv_len` (as described by `positions`);
/// - `k`, `v`: `(batch, n_kv_heads, kv_len, head_dim)`, keys un-rotated, at positions
///   `0 .. kv_len`; `n_heads` must be a multiple of `n_kv_heads` (GQA).
///
/// Returns `(batch, n_heads, q_len, head_dim)` in the dtype of `q`. Scores and the
/// softmax are always computed in f32.
pub fn run_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Positions,
    params: &AttentionParams,
) -> Result<Tensor> {
    check_shapes(q, k, v, positions)?;
    match params.backend {
        AttentionBackend::Naive => naive::attention(q, k, v, positions, params),
        AttentionBackend::Tiled { query_block } => {
            tiled::attention(q, k, v, positions, params, query_block)
        }
        AttentionBackend::Fused => {
            if let Some(out) = fused::attention(q, k, v, positions, params)? {
                return Ok(out);
            }
            #[cfg(feature = "cuda")]
            if let Some(out) = cuda::attention(q, k, v, positions, params)? {
                return Ok(out);
            }
            tiled::attention(q, k, v, positions, params, tiled::QUERY_BLOCK)
        }
    }
}

/// One sequence of a [`run_attention_ragged`] call: the operands and settings
/// [`run_attention`] takes, with one batch row.
pub struct Ragged<'c, 'p> {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub positions: &'c Positions<'p>,
    pub params: &'c AttentionParams,
}

/// Attention for a ragged batch: sequences of different lengths, each over its own
/// cache with its own positions and settings, as [`run_attention`] would compute each
/// alone. `q: (1, n_heads, q_len, head_dim)` may differ in `q_len` and the keys in
/// `kv_len`; `n_heads`, `head_dim` and the dtype are shared.
///
/// Returns `(1, Σ q_len, n_heads * head_dim)`: the sequences' rows in order, each row
/// its heads side by side, as the output projection reads them. The fused backend runs
/// every sequence's work as one parallel pass (a decode step of many short sequences is
/// otherwise too small to spread over the cores); the others run one call each.
pub fn run_attention_ragged(seqs: &[Ragged]) -> Result<Tensor> {
    let Some(first) = seqs.first() else {
        return Err(candle_core::Error::Msg("ragged attention needs a sequence".into()).into());
    };
    let (_, n_heads, _, head_dim) = first.q.dims4()?;
    for s in seqs {
        check_shapes(&s.q, &s.k, &s.v, s.positions)?;
        let (b, h, _, d) = s.q.dims4()?;
        if (b, h, d) != (1, n_heads, head_dim) || s.q.dtype() != first.q.dtype() {
            return Err(candle_core::Error::Msg(format!(
                "ragged attention needs one batch row and a shared head count, head \
                 dimension and dtype, got q {:?} ({:?}) and q {:?} ({:?})",
                first.q.dims(),
                first.q.dtype(),
                s.q.dims(),
                s.q.dtype()
            ))
            .into());
        }
    }
    if seqs
        .iter()
        .all(|s| s.params.backend == AttentionBackend::Fused)
    {
        if let Some(out) = fused::ragged(seqs)? {
            return Ok(out);
        }
    }
    let outputs = seqs
        .iter()
        .map(|s| {
            let ys = run_attention(&s.q, &s.k, &s.v, s.positions, s.params)?;
            let q_len = ys.dim(2)?;
            Ok(ys
                .transpose(1, 2)?
                .reshape((1, q_len, n_heads * head_dim))?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&outputs, 1)?)
}
