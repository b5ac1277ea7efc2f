//! Linear layers over 4-bit GGUF weights (Q4_0, Q4_1) on the CPU, read as 4 bits.
//!
//! candle has no SIMD dot product for Q4_1, so such weights used to be re-quantized
//! to Q8_0, 1.7x the bytes read per decoded token. Here a weight row keeps its 4-bit
//! codes `q` and, per block of 32, a scale `d` and an offset `m` (`w = d q + m`; Q4_0
//! is `m = -8 d`). Activations are quantized to 8 bits per block of 32 (`x ≈ da qa`,
//! as llama.cpp's Q8_1), and
//!
//! ```text
//! y[r, c] = Σ_b d[c,b] da[r,b] Σ_i q[c,b,i] qa[r,b,i]  +  Σ_b m[c,b] sa[r,b],   sa = da Σ_i qa
//! ```
//!
//! The codes are unsigned, so the integer dot products map straight onto
//! `vpdpbusd` (AVX-512 VNNI) or `vpmaddubsw` (AVX2), chosen at run time; a tile of 4
//! output columns × up to 4 input rows shares every load, so a batch of decode rows
//! reads the weights once.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

use crate::error::{Error, Result};

const BLOCK: usize = 32;
/// Output columns per tile.
const COLS: usize = 4;
/// Input rows per tile, at most.
const ROWS: usize = 4;

/// A `(out_features, in_features)` weight in 4-bit blocks, padded to whole tiles: rows
/// to a multiple of [`COLS`], blocks per row to an even count (zero codes and scales).
#[derive(Debug)]
pub(crate) struct Q4Matrix {
    out_features: usize,
    in_features: usize,
    /// Rows after padding.
    rows: usize,
    /// Blocks per row after padding.
    blocks: usize,
    /// Per row, 16 bytes a block: value `i` is the low nibble of byte `i` for `i < 16`,
    /// the high nibble of byte `i - 16` otherwise (GGUF's order).
    codes: Vec<u8>,
    scales: Vec<f16>,
    offsets: Vec<f16>,
}

impl Q4Matrix {
    /// The 4-bit blocks of `q` (Q4_0 or Q4_1), or `None` for other block types.
    pub(crate) fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let (out_features, in_features) = match q.shape().dims() {
            &[o, i] => (o, i),
            _ => return Ok(None),
        };
        let (block_bytes, has_offset) = match q.dtype() {
            GgmlDType::Q4_0 => (18, false),
            GgmlDType::Q4_1 => (20, true),
            _ => return Ok(None),
        };
        if in_features % BLOCK != 0 {
            return Ok(None);
        }
        let data = q.data()?;
        let file_blocks = in_features / BLOCK;
        if data.len() != out_features * file_blocks * block_bytes {
            return Err(Error::invalid(
                "weights",
                format!(
                    "a {:?} tensor of shape ({out_features}, {in_features}) holds {} bytes",
                    q.dtype(),
                    data.len()
                ),
            ));
        }
        let rows = out_features.next_multiple_of(COLS);
        let blocks = file_blocks.next_multiple_of(2);
        let mut codes = vec![0u8; rows * blocks * 16];
        let mut scales = vec![f16::ZERO; rows * blocks];
        let mut offsets = vec![f16::ZERO; rows * blocks];
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        for (r, row) in data.chunks_exact(file_blocks * block_bytes).enumerate() {
            for (b, block) in row.chunks_exact(block_bytes).enumerate() {
                let i = r * blocks + b;
                let d = half(&block[0..2]);
                scales[i] = d;
                offsets[i] = match has_offset {
                    true => half(&block[2..4]),
                    false => f16::from_f32(-8.0 * d.to_f32()),
                };
                codes[i * 16..(i + 1) * 16].copy_from_slice(&block[block_bytes - 16..]);
            }
        }
        Ok(Some(Self {
            out_features,
            in_features,
            rows,
            blocks,
            codes,
            scales,
            offsets,
        }))
    }

    /// The rows of `parts` one after the other (stacked q/k/v, gate/up), or `None`
    /// if their inputs differ.
    pub(crate) fn stack(parts: &[&Q4Matrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.in_features != first.in_features) {
            return None;
        }
        let blocks = first.blocks;
        let out_features: usize = parts.iter().map(|p| p.out_features).sum();
        let rows = out_features.next_multiple_of(COLS);
        let mut codes = Vec::with_capacity(rows * blocks * 16);
        let mut scales = Vec::with_capacity(rows * blocks);
        let mut offsets = Vec::with_capacity(rows * blocks);
        for p in parts {
            let real = p.out_features * blocks;
            codes.extend_from_slice(&p.codes[..real * 16]);
            scales.extend_from_slice(&p.scales[..real]);
            offsets.extend_from_slice(&p.offsets[..real]);
        }
        codes.resize(rows * blocks * 16, 0);
        scales.resize(rows * blocks, f16::ZERO);
        offsets.resize(rows * blocks, f16::ZERO);
        Some(Self {
            out_features,
            in_features: first.in_features,
            rows,
            blocks,
            codes,
            scales,
            offsets,
        })
    }

    pub(crate) fn in_features(&self) -> usize {
        self.in_features
    }

    pub(crate) fn out_features(&self) -> usize {
        self.out_features
    }

    /// The weights as f32, `(out_features, in_features)`.
    pub(crate) fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let n = self.in_features;
        let mut w = vec![0f32; self.out_features * n];
        for (r, row) in w.chunks_exact_mut(n).enumerate() {
            for (b, values) in row.chunks_exact_mut(BLOCK).enumerate() {
                let i = r * self.blocks + b;
                let (d, m) = (self.scales[i].to_f32(), self.offsets[i].to_f32());
                let codes = &self.codes[i * 16..(i + 1) * 16];
                for (j, &byte) in codes.iter().enumerate() {
                    values[j] = d * (byte & 0x0f) as f32 + m;
                    values[j + 16] = d * (byte >> 4) as f32 + m;
                }
            }
        }
        Ok(Tensor::from_vec(w, (self.out_features, n), device)?)
    }

    /// `x @ wᵀ` for `x: (rows, in_features)` row-major; returns `(rows, out_features)`.
    pub(crate) fn matmul(&self, x: &[f32], n_rows: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), n_rows * self.in_features);
        let acts = Activations::quantize(x, n_rows, self.in_features, self.blocks);
        let mut y = vec![0f32; n_rows * self.out_features];
        let kernel = Kernel::detect();
        let col_tiles = self.rows / COLS;
        let row_tiles = n_rows.div_ceil(ROWS);
        let out = SharedOut(y.as_mut_ptr());
        let run = |range: std::ops::Range<usize>| {
            let mut tile = [[0f32; COLS]; ROWS];
            // Column-tile major: a worker's consecutive items reuse the same weights.
            for item in range {
                let (ct, rt) = (item / row_tiles, item % row_tiles);
                let (c0, r0) = (ct * COLS, rt * ROWS);
                let rows = ROWS.min(n_rows - r0);
                kernel.tile(self, &acts, TileAt { c0, r0, rows }, &mut tile);
                for (r, values) in tile.iter().enumerate().take(rows) {
                    for (c, &v) in values.iter().enumerate() {
                        if c0 + c < self.out_features {
                            // SAFETY: (r0 + r, c0 + c) is in bounds and written by this item only.
                            unsafe { out.write((r0 + r) * self.out_features + c0 + c, v) };
                        }
                    }
                }
            }
        };
        let items = col_tiles * row_tiles;
        // Small products (a short row of one tiny layer) are not worth waking workers.
        if items * self.blocks < 64 {
            run(0..items);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(items, run);
        }
        y
    }

    fn row_codes(&self, row: usize) -> &[u8] {
        &self.codes[row * self.blocks * 16..(row + 1) * self.blocks * 16]
    }

    fn row_scales(&self, row: usize) -> (&[f16], &[f16]) {
        let range = row * self.blocks..(row + 1) * self.blocks;
        (&self.scales[range.clone()], &self.offsets[range])
    }
}

#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint elements (see `matmul`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` is in bounds, and no other thread reads or writes element `i`.
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// Input rows quantized per block of 32: `x ≈ da * qa`, and `sa = da * Σ qa`.
struct Activations {
    blocks: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], rows: usize, in_features: usize, blocks: usize) -> Self {
        let mut codes = vec![0i8; rows * blocks * BLOCK];
        let mut scales = vec![0f32; rows * blocks];
        let mut sums = vec![0f32; rows * blocks];
        for (r, row) in x.chunks_exact(in_features).enumerate() {
            for (b, values) in row.chunks_exact(BLOCK).enumerate() {
                let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let i = r * blocks + b;
                let mut sum = 0i32;
                for (q, &v) in codes[i * BLOCK..(i + 1) * BLOCK].iter_mut().zip(values) {
                    *q = (v * inv).round() as i8;
                    sum += *q as i32;
                }
                scales[i] = d;
                sums[i] = d * sum as f32;
            }
        }
        Self {
            blocks,
            codes,
            scales,
            sums,
        }
    }

    fn row(&self, r: usize) -> (&[i8], &[f32], &[f32]) {
        let blocks = r * self.blocks..(r + 1) * self.blocks;
        (
            &self.codes[r * self.blocks * BLOCK..(r + 1) * self.blocks * BLOCK],
            &self.scales[blocks.clone()],
            &self.sums[blocks],
        )
    }
}

/// Where a tile sits: output columns `c0..c0 + COLS`, input rows `r0..r0 + rows`.
#[derive(Clone, Copy, Debug)]
struct TileAt {
    c0: usize,
    r0: usize,
    rows: usize,
}

/// The dot-product code this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    pub(crate) fn detect() -> Self {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<Kernel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let all = Self::available();
            let best = *all.last().expect("the scalar kernel is always there");
            match best {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512Vnni if std::env::var_os("SELFEXTEND_NO_AVX512").is_some() => {
                    all[all.len() - 2]
                }
                _ => best,
            }
        })
    }

    /// The kernels this CPU can run, best last. `SELFEXTEND_NO_AVX512=1` makes
    /// [`Kernel::detect`] skip AVX-512, to measure the AVX2 path on an AVX-512 machine.
    fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut all = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                all.push(Kernel::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    all.push(Kernel::Avx512Vnni);
                }
            }
        }
        all
    }

    /// `out[r][c] = y[at.r0 + r, at.c0 + c]` for `r < at.rows`.
    fn tile(self, w: &Q4Matrix, a: &Activations, at: TileAt, out: &mut [[f32; COLS]; ROWS]) {
        match self {
            Kernel::Scalar => scalar_tile(w, a, at, out),
            // SAFETY: `detect`/`available` chose these only where the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::avx2_tile(w, a, at, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::avx512_tile(w, a, at, out) },
        }
    }
}

/// The reference kernel: the formula of the module docs, one value at a time.
fn scalar_tile(w: &Q4Matrix, a: &Activations, at: TileAt, out: &mut [[f32; COLS]; ROWS]) {
    let TileAt { c0, r0, rows } = at;
    for (r, values) in out.iter_mut().enumerate().take(rows) {
        let (qa, da, sa) = a.row(r0 + r);
        for (c, v) in values.iter_mut().enumerate() {
            let codes = w.row_codes(c0 + c);
            let (d, m) = w.row_scales(c0 + c);
            let mut acc = 0f32;
            for b in 0..w.blocks {
                let mut dot = 0i32;
                for j in 0..16 {
                    let byte = codes[b * 16 + j];
                    dot += (byte & 0x0f) as i32 * qa[b * BLOCK + j] as i32;
                    dot += (byte >> 4) as i32 * qa[b * BLOCK + j + 16] as i32;
                }
                acc += d[b].to_f32() * da[b] * dot as f32 + m[b].to_f32() * sa[b];
            }
            *v = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Activations, Q4Matrix, TileAt, BLOCK, COLS, ROWS};

    /// Sum of the 8 lanes.
    #[target_feature(enable = "avx2")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `Σ_b m[b] sa[b]` over f16 offsets and f32 sums, 8 blocks a step.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn offset_term(m: &[half::f16], sa: &[f32]) -> f32 {
        let n = m.len();
        let mut acc = _mm256_setzero_ps();
        let mut b = 0;
        while b + 8 <= n {
            let mv = _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr().add(b) as *const __m128i));
            acc = _mm256_fmadd_ps(mv, _mm256_loadu_ps(sa.as_ptr().add(b)), acc);
            b += 8;
        }
        let mut s = hsum256(acc);
        while b < n {
            s += m[b].to_f32() * sa[b];
            b += 1;
        }
        s
    }

    /// One block's 32 codes, as bytes 0..=15 in value order.
    #[target_feature(enable = "avx2")]
    unsafe fn unpack_block(codes: *const u8) -> __m256i {
        let raw = _mm_loadu_si128(codes as *const __m128i);
        let low = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(raw, low);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        _mm256_set_m128i(hi, lo)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2_tile(
        w: &Q4Matrix,
        a: &Activations,
        at: TileAt,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        let TileAt { c0, r0, rows } = at;
        // Two rows at a time keep 8 accumulators and the 4 unpacked blocks in registers.
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(2);
            let mut acc = [[_mm256_setzero_ps(); COLS]; 2];
            let ones = _mm256_set1_epi16(1);
            for b in 0..w.blocks {
                let mut codes = [_mm256_setzero_si256(); COLS];
                let mut d = [0f32; COLS];
                for c in 0..COLS {
                    codes[c] = unpack_block(w.row_codes(c0 + c).as_ptr().add(b * 16));
                    d[c] = w.row_scales(c0 + c).0[b].to_f32();
                }
                for (i, acc) in acc.iter_mut().enumerate().take(n) {
                    let (qa, da, _) = a.row(r0 + r + i);
                    let x = _mm256_loadu_si256(qa.as_ptr().add(b * BLOCK) as *const __m256i);
                    for c in 0..COLS {
                        // codes ≤ 15 and |qa| ≤ 127: the i16 pair sums cannot saturate.
                        let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes[c], x), ones);
                        let scale = _mm256_set1_ps(d[c] * da[b]);
                        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[c]);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(n) {
                let (_, _, sa) = a.row(r0 + r + i);
                for c in 0..COLS {
                    let m = w.row_scales(c0 + c).1;
                    out[r + i][c] = hsum256(acc[c]) + offset_term(m, sa);
                }
            }
            r += n;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn avx512_tile(
        w: &Q4Matrix,
        a: &Activations,
        at: TileAt,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        let TileAt { c0, r0, rows } = at;
        let mut acc = [[_mm512_setzero_ps(); COLS]; ROWS];
        let low = _mm256_set1_epi8(0x0f);
        let codes_at: [*const u8; COLS] = std::array::from_fn(|c| w.row_codes(c0 + c).as_ptr());
        let scales_at: [&[half::f16]; COLS] = std::array::from_fn(|c| w.row_scales(c0 + c).0);
        let rows_at: [(*const i8, &[f32]); ROWS] = std::array::from_fn(|r| {
            let (qa, da, _) = a.row(r0 + r.min(rows - 1));
            (qa.as_ptr(), da)
        });
        // Two blocks (64 values) a step: lanes 0..8 of a product belong to the first.
        for p in 0..w.blocks / 2 {
            let b = 2 * p;
            let mut codes = [_mm512_setzero_si512(); COLS];
            let mut d = [_mm512_setzero_ps(); COLS];
            for c in 0..COLS {
                let raw = _mm256_loadu_si256(codes_at[c].add(b * 16) as *const __m256i);
                let lo = _mm256_and_si256(raw, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                // [lo0 lo1 hi0 hi1] (16 bytes each) to [lo0 hi0 lo1 hi1]: value order.
                let both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                codes[c] = _mm512_shuffle_i64x2(both, both, 0b11_01_10_00);
                let s = scales_at[c];
                d[c] = pair(s[b].to_f32(), s[b + 1].to_f32());
            }
            for (acc, &(qa, da)) in acc.iter_mut().zip(&rows_at).take(rows) {
                let x = _mm512_loadu_si512(qa.add(b * BLOCK) as *const __m512i);
                let da = pair(da[b], da[b + 1]);
                for c in 0..COLS {
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[c], x);
                    let scale = _mm512_mul_ps(d[c], da);
                    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[c]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let (_, _, sa) = a.row(r0 + r);
            for c in 0..COLS {
                let m = w.row_scales(c0 + c).1;
                out[r][c] = _mm512_reduce_add_ps(acc[c]) + offset_term(m, sa);
            }
        }
    }

    /// `[x; 8] ++ [y; 8]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pair(x: f32, y: f32) -> __m512 {
        let low = _mm512_castps_pd(_mm512_set1_ps(x));
        let high = _mm256_castps_pd(_mm256_set1_ps(y));
        _mm512_castpd_ps(_mm512_insertf64x4(low, high, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every kernel against the f64 product of the dequantized weights and the
    /// activations as the kernel quantizes them (the only rounding left is f32
    /// accumulation), over shapes with padded rows, odd block counts and row tails.
    #[test]
    fn kernels_match_the_dequantized_product() -> Result<()> {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1] {
            for (out_f, in_f, n_rows) in [(8, 64, 1), (13, 96, 3), (192, 576, 8), (6, 1536, 5)] {
                let w = Tensor::from_vec(random(out_f * in_f, 1), (out_f, in_f), &Device::Cpu)?;
                let q = QTensor::quantize(&w, dtype)?;
                let m = Q4Matrix::from_qtensor(&q)?.expect("4-bit blocks");
                let dense = m.dequantize(&Device::Cpu)?;
                let reference = q.dequantize(&Device::Cpu)?;
                let diff = (&dense - &reference)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "{dtype:?}: dequantization differs from candle's");
                let wd: Vec<f32> = dense.flatten_all()?.to_vec1()?;
                let x = random(n_rows * in_f, 2);
                let acts = Activations::quantize(&x, n_rows, in_f, m.blocks);
                let mut expected = vec![0f64; n_rows * out_f];
                for r in 0..n_rows {
                    let (qa, da, _) = acts.row(r);
                    for c in 0..out_f {
                        expected[r * out_f + c] = (0..in_f)
                            .map(|i| wd[c * in_f + i] as f64 * qa[i] as f64 * da[i / BLOCK] as f64)
                            .sum();
                    }
                }
                for kernel in Kernel::available() {
                    let mut got = vec![0f32; n_rows * out_f];
                    let mut tile = [[0f32; COLS]; ROWS];
                    for c0 in (0..m.rows).step_by(COLS) {
                        for r0 in (0..n_rows).step_by(ROWS) {
                            let rows = ROWS.min(n_rows - r0);
                            kernel.tile(&m, &acts, TileAt { c0, r0, rows }, &mut tile);
                            for r in 0..rows {
                                for c in 0..COLS.min(out_f - c0) {
                                    got[(r0 + r) * out_f + c0 + c] = tile[r][c];
                                }
                            }
                        }
                    }
                    for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                        let tol = 1e-5 * (1.0 + e.abs());
                        assert!(
                            (g as f64 - e).abs() <= tol,
                            "{kernel:?} {dtype:?} ({out_f}x{in_f}, {n_rows} rows) at {i}: {g} vs {e}"
                        );
                    }
                    eprintln!("{kernel:?} {dtype:?} {out_f}x{in_f} x {n_rows} rows: ok");
                }
            }
        }
        Ok(())
    }

    /// The threaded product equals the tiles, and approximates the f32 product within
    /// the 8-bit activation quantization's error.
    #[test]
    fn matmul_approximates_the_dense_product() -> Result<()> {
        let (out_f, in_f, n_rows) = (130, 320, 6);
        let w = Tensor::from_vec(random(out_f * in_f, 3), (out_f, in_f), &Device::Cpu)?;
        let m = Q4Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1)?)?.expect("Q4_1");
        let x = random(n_rows * in_f, 4);
        let got = m.matmul(&x, n_rows);
        let xt = Tensor::from_vec(x, (n_rows, in_f), &Device::Cpu)?;
        let want: Vec<f32> = xt
            .matmul(&m.dequantize(&Device::Cpu)?.t()?)?
            .flatten_all()?
            .to_vec1()?;
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (g, e) in got.iter().zip(&want) {
            assert!((g - e).abs() <= 0.02 * scale, "{g} vs {e}");
        }
        Ok(())
    }
}
