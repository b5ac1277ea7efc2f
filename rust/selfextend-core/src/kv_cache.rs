//! The key/value cache.
//!
//! Keys are stored **un-rotated**. SelfExtend scores each key at two rotary positions
//! (`j` and `j / G`), and which one applies depends on the query; storing the raw key
//! keeps the cache exactly as large as plain attention's, lets one cache serve any
//! `(G, W)` and any RoPE variant, and leaves the rotation to the attention backend.
//!
//! Buffers are preallocated and grow geometrically, so appending a decode step
//! writes one row per head instead of copying the whole cache.

use candle_core::{CpuStorage, DType, Layout, Tensor};
use half::slice::HalfFloatSliceExt;

use crate::error::Result;

const MIN_CAPACITY: usize = 64;

/// One layer's keys and values: `(batch, n_kv_heads, capacity, head_dim)` buffers of
/// which the first `len` positions are filled.
#[derive(Debug, Clone)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    reserve: usize,
    /// The dtype stored; `None` keeps what is appended.
    dtype: Option<DType>,
}

impl LayerCache {
    fn new(reserve: usize, dtype: Option<DType>) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            reserve,
            dtype,
        }
    }

    /// Appends `k`, `v: (batch, n_kv_heads, seq, head_dim)` and returns views of every
    /// cached position, `(batch, n_kv_heads, len, head_dim)`.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let dtype = self.dtype.unwrap_or(k.dtype());
        let seq = k.dim(2)?;
        let needed = self.len + seq;
        let capacity = self.k.as_ref().map_or(0, |t| t.dims()[2]);
        if needed > capacity {
            let new_capacity = needed.max(2 * capacity).max(self.reserve).max(MIN_CAPACITY);
            self.k = Some(grow(self.k.take(), k, dtype, self.len, new_capacity)?);
            self.v = Some(grow(self.v.take(), v, dtype, self.len, new_capacity)?);
        }
        let (ck, cv) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        for (cache, new) in [(ck, k), (cv, v)] {
            let (b, h, _, d) = cache.dims4()?;
            let floats = |t: DType| matches!(t, DType::F32 | DType::F16);
            if cache.device().is_cpu()
                && floats(dtype)
                && floats(new.dtype())
                && new.dims4()? == (b, h, seq, d)
                && new.stride()[3] == 1
            {
                // One pass from the projection's strided rows into the buffer, converting
                // as it goes: decode appends a row per head of every sequence, every layer.
                cache.inplace_op2(new, &WriteRows { at: self.len })?;
            } else {
                cache.slice_set(&new.to_dtype(dtype)?.contiguous()?, 2, self.len)?;
            }
        }
        self.len = needed;
        Ok((ck.narrow(2, 0, self.len)?, cv.narrow(2, 0, self.len)?))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the buffers (capacity, not just the filled part).
    pub fn allocated_bytes(&self) -> usize {
        [&self.k, &self.v]
            .into_iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Writes `src: (batch, heads, rows, head_dim)` (any strides with unit inner stride,
/// f32 or f16) into a contiguous `(batch, heads, capacity, head_dim)` buffer at
/// positions `at ..`, converting to the buffer's dtype.
struct WriteRows {
    at: usize,
}

impl candle_core::InplaceOp2 for WriteRows {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (dims, s) = (src_l.dims(), src_l.stride());
        let (b, h, rows, d) = (dims[0], dims[1], dims[2], dims[3]);
        let cap = dst_l.dims()[2];
        if !dst_l.is_contiguous() || s[3] != 1 || self.at + rows > cap {
            candle_core::bail!("kv-write-rows: unexpected layouts {dst_l:?} {src_l:?}");
        }
        let rows_of = |i: usize, j: usize| {
            (0..rows).map(move |t| {
                let from = src_l.start_offset() + i * s[0] + j * s[1] + t * s[2];
                let to = dst_l.start_offset() + ((i * h + j) * cap + self.at + t) * d;
                (from, to)
            })
        };
        let all = (0..b).flat_map(|i| (0..h).flat_map(move |j| rows_of(i, j)));
        use candle_core::backend::BackendStorage;
        match (dst, src) {
            (CpuStorage::F16(out), CpuStorage::F32(x)) => all
                .for_each(|(from, to)| out[to..to + d].convert_from_f32_slice(&x[from..from + d])),
            (CpuStorage::F16(out), CpuStorage::F16(x)) => {
                all.for_each(|(from, to)| out[to..to + d].copy_from_slice(&x[from..from + d]))
            }
            (CpuStorage::F32(out), CpuStorage::F32(x)) => {
                all.for_each(|(from, to)| out[to..to + d].copy_from_slice(&x[from..from + d]))
            }
            (CpuStorage::F32(out), CpuStorage::F16(x)) => all.for_each(|(from, to)| {
                x[from..from + d].convert_to_f32_slice(&mut out[to..to + d])
            }),
            (dst, src) => candle_core::bail!(
                "kv-write-rows: {:?} into a {:?} cache",
                src.dtype(),
                dst.dtype()
            ),
        }
        Ok(())
    }
}

fn grow(
    old: Option<Tensor>,
    like: &Tensor,
    dtype: DType,
    len: usize,
    capacity: usize,
) -> Result<Tensor> {
    let (b, h, _, d) = like.dims4()?;
    let buf = Tensor::zeros((b, h, capacity, d), dtype, like.device())?;
    if let Some(old) = old {
        if len > 0 {
            buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
    }
    Ok(buf)
}

/// The cache of every layer of one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache; `reserve` positions are allocated at the first append, so a
    /// generation that knows its final length never grows. Keys and values are stored
    /// in `dtype`, or as they come when `None`.
    pub fn new(num_layers: usize, reserve: usize, dtype: Option<DType>) -> Self {
        Self {
            layers: (0..num_layers)
                .map(|_| LayerCache::new(reserve, dtype))
                .collect(),
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn layer_mut(&mut self, idx: usize) -> &mut LayerCache {
        &mut self.layers[idx]
    }

    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::allocated_bytes).sum()
    }

    /// Bytes a cache of `positions` positions needs: keys plus values for every layer.
    pub fn bytes_for(
        positions: usize,
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        // Saturating: a request for 2^62 positions must read as too big, not wrap.
        [
            num_layers,
            num_kv_heads,
            head_dim,
            positions,
            dtype.size_in_bytes(),
        ]
        .into_iter()
        .fold(2, usize::saturating_mul)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn append_grows_and_keeps_contents() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = LayerCache::new(0, None);
        let mut all = vec![];
        for step in 0..40 {
            let seq = 1 + step % 7;
            let k = Tensor::rand(0f32, 1f32, (1, 2, seq, 4), &dev)?;
            all.push(k.clone());
            let (ck, cv) = cache.append(&k, &(&k * 2.0)?)?;
            let expect = Tensor::cat(&all, 2)?;
            let diff = (ck - &expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
            let diff = (cv - (&expect * 2.0)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
        }
        assert!(cache.len() > 100);
        let cap = cache.allocated_bytes() / (2 * 2 * 4 * 4);
        assert!(cap >= cache.len() && cap < 2 * cache.len().max(MIN_CAPACITY));
        Ok(())
    }

    /// Strided rows (a projection's output split into heads, as the decoder passes them)
    /// land in every kind of cache as `to_dtype` then a copy would put them there.
    #[test]
    fn append_converts_strided_rows() -> Result<()> {
        let dev = Device::Cpu;
        for (stored, given) in [
            (None, DType::F32),
            (Some(DType::F16), DType::F32),
            (Some(DType::F32), DType::F32),
            (Some(DType::F16), DType::F16),
            (Some(DType::F32), DType::F16),
            (Some(DType::BF16), DType::F32),
        ] {
            let mut cache = LayerCache::new(5, stored);
            let mut all = vec![];
            for seq in [3, 1, 1, 4] {
                // (1, seq, heads * d) -> (1, heads, seq, d): not contiguous.
                let x = Tensor::randn(0f32, 1f32, (1, seq, 2 * 4), &dev)?.to_dtype(given)?;
                let k = x.reshape((1, seq, 2, 4))?.transpose(1, 2)?;
                assert!(seq == 1 || !k.is_contiguous());
                let (ck, cv) = cache.append(&k, &k.affine(-1.0, 0.0)?)?;
                all.push(k.to_dtype(stored.unwrap_or(given))?);
                let want = Tensor::cat(&all, 2)?.to_dtype(DType::F32)?;
                for (got, sign) in [(ck, 1.0), (cv, -1.0)] {
                    assert_eq!(got.dtype(), stored.unwrap_or(given));
                    let got = got.to_dtype(DType::F32)?.affine(sign, 0.0)?;
                    let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert_eq!(diff, 0.0, "{stored:?} cache, {given:?} rows");
                }
            }
        }
        Ok(())
    }
}
