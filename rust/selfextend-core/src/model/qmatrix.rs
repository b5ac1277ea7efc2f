//! Linear layers over Q4_0, Q4_1, Q5_0, Q8_0 and Q4_K GGUF weights on the CPU.
//!
//! candle has no SIMD dot product for Q4_1 or Q5_0 (such weights used to be
//! re-quantized to Q8_0, 1.7x the bytes read per decoded token of Q4_1), and its Q8_0
//! and K-quant products read one weight row per output. Here a weight keeps its codes
//! `q` and, per block of 32, a scale `d` and for 4-bit codes an offset `m` (`w = d q +
//! m`; Q4_0 is `m = -8 d`; Q5_0's 5-bit codes are stored as 8-bit `q - 16`; Q4_K's
//! super-blocks of 256 become 8 such blocks). Activations
//! are quantized to 8 bits per block of 32 (`x ≈ da qa`, as llama.cpp's Q8_1), and
//!
//! ```text
//! y[r, c] = Σ_b d[c,b] da[r,b] Σ_i q[c,b,i] qa[r,b,i]  +  Σ_b m[c,b] sa[r,b],   sa = da Σ_i qa
//! ```
//!
//! The weights are stored interleaved by tiles of 16 output columns, so that one SIMD
//! lane is one output column: a single `vpdpbusd` (AVX-512 VNNI) multiplies four
//! consecutive codes of 16 columns by the same four activation bytes, broadcast.
//! 4-bit codes are unsigned, its unsigned operand as they are; 8-bit codes are read as
//! `q + 128` and each block's sum corrected by `128 Σ qa`. AVX2 does the same with
//! `vpmaddubsw` over 8 columns (with the sign trick for 8-bit codes). No horizontal
//! sums, and every weight load serves all the rows of a tile (up to 8 decode rows).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
#[cfg(test)]
use candle_core::{Device, Tensor};
use half::f16;

use crate::error::{Error, Result};

const BLOCK: usize = 32;
/// Output columns per tile: one per lane of a 512-bit register of i32.
const COLS: usize = 16;
/// Input rows per tile, at most.
const ROWS: usize = 8;
/// How many blocks ahead of the one it reads a kernel prefetches codes. A tile's codes
/// are contiguous but cross 4 KiB pages, where the hardware prefetchers stop; with
/// several rows the kernel reads them slowly enough for software prefetch to hide
/// that (8 decode rows: +10% on an AMD EPYC, see BENCHMARKS.md).
const PREFETCH_BLOCKS: usize = 16;

/// The least a buffer of codes shared by several matrices holds (several huge pages).
const HUGE_PAGE_SHARE: usize = 32 << 20;

/// How codes are stored, per tile and block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// 256 bytes `packed[g][c][t]` (`g < 4`, `c < 16`, `t < 4`) whose low nibble is
    /// code `4 g + t` of column `c` and whose high nibble is code `4 (g + 4) + t`: one
    /// 64-byte row of it, unpacked, is the operand of two `vpdpbusd`.
    U4,
    /// 512 signed bytes `packed[g][c][t]` (`g < 8`): code `4 g + t` of column `c`.
    I8,
}

impl Format {
    /// Bytes of one block of one tile.
    fn tile_block_bytes(self) -> usize {
        match self {
            Format::U4 => COLS * BLOCK / 2,
            Format::I8 => COLS * BLOCK,
        }
    }
}

/// A `(out_features, in_features)` quantized weight, padded to whole tiles of
/// [`COLS`] rows (zero codes and scales).
#[derive(Debug)]
pub(crate) struct QMatrix {
    format: Format,
    out_features: usize,
    in_features: usize,
    blocks: usize,
    /// Tile-major, then block: `(tiles * blocks) * format.tile_block_bytes()`.
    codes: Codes,
    /// Tile-major, then block, then column: `(tiles * blocks) * COLS`.
    scales: Vec<f16>,
    /// As `scales`; empty for [`Format::I8`].
    offsets: Vec<f16>,
}

/// Packed codes: a range of a buffer that several matrices may share (see
/// [`QMatrix::share_huge_pages`]). The range is kept as a pointer and length: the
/// kernels index codes in their block loops, where going through the `Arc` and the
/// range each time cost loads and bounds checks.
#[derive(Debug)]
struct Codes {
    ptr: *const u8,
    len: usize,
    /// Keeps `ptr .. ptr + len` alive; never written after the codes are built.
    _buf: Arc<Vec<u8>>,
}

// SAFETY: the bytes behind `ptr` belong to `_buf`, which is shared read-only.
unsafe impl Send for Codes {}
unsafe impl Sync for Codes {}

impl Codes {
    fn new(buf: Arc<Vec<u8>>, range: Range<usize>) -> Self {
        let bytes = &buf[range];
        Self {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            _buf: buf,
        }
    }

    fn own(buf: Vec<u8>) -> Self {
        let len = buf.len();
        Self::new(Arc::new(buf), 0..len)
    }
}

impl std::ops::Deref for Codes {
    type Target = [u8];

    #[inline(always)]
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr .. ptr + len` was checked to lie in `_buf` (see `new`), which
        // this value keeps alive and nothing mutates.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// One block of one row in GGUF's terms: scale, offset (0 for 8-bit codes), and the
/// 32 codes in order.
struct RowBlock {
    d: f16,
    m: f16,
    codes: [i8; BLOCK],
}

impl QMatrix {
    /// The blocks of `q` (Q4_0, Q4_1, Q5_0, Q8_0 or Q4_K), or `None` for other block
    /// types.
    ///
    /// Q4_K's super-blocks of 256 become 8 blocks of 32 with scale `d · sc` and offset
    /// `-dmin · m`, rounded to f16 (GGUF keeps `d` and `dmin` in f16 and `sc`, `m` as
    /// 6-bit integers), so its weights are GGUF's within a relative 2⁻¹¹ of each block's
    /// scale and offset; a tensor where some product falls outside f16's normal range
    /// is left to candle (`None`). The other types are read exactly.
    pub(crate) fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let (out_features, in_features) = match q.shape().dims() {
            &[o, i] => (o, i),
            _ => return Ok(None),
        };
        let dtype = q.dtype();
        // The format, and the bytes and weights of one stored block.
        let (format, unit_bytes, unit) = match dtype {
            GgmlDType::Q4_0 => (Format::U4, 18, BLOCK),
            GgmlDType::Q4_1 => (Format::U4, 20, BLOCK),
            GgmlDType::Q5_0 => (Format::I8, 22, BLOCK),
            GgmlDType::Q8_0 => (Format::I8, 34, BLOCK),
            GgmlDType::Q4K => (Format::U4, 144, 256),
            _ => return Ok(None),
        };
        if in_features % unit != 0 {
            return Ok(None);
        }
        let data = q.data()?;
        let units = in_features / unit;
        if data.len() != out_features * units * unit_bytes {
            return Err(Error::invalid(
                "weights",
                format!(
                    "a {:?} tensor of shape ({out_features}, {in_features}) holds {} bytes",
                    q.dtype(),
                    data.len()
                ),
            ));
        }
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        // Every Q4_K block's scale and offset must be a normal f16 (or zero), where
        // rounding costs at most 2⁻¹¹ of it; otherwise candle runs the layer.
        let normal = |x: f32| {
            x == 0.0 || (f16::MIN_POSITIVE.to_f32()..=f16::MAX.to_f32()).contains(&x.abs())
        };
        if dtype == GgmlDType::Q4K
            && !data.chunks_exact(unit_bytes).all(|stored| {
                let (d, dmin) = (half(&stored[0..2]).to_f32(), half(&stored[2..4]).to_f32());
                (0..unit / BLOCK).all(|j| {
                    let (sc, min) = k_scale_min(&stored[4..16], j);
                    normal(d * sc as f32) && normal(dmin * min as f32)
                })
            })
        {
            return Ok(None);
        }
        Ok(Some(Self::build(
            format,
            out_features,
            in_features,
            |row, b| {
                let per_unit = unit / BLOCK;
                let stored = &data[(row * units + b / per_unit) * unit_bytes..][..unit_bytes];
                let mut codes = [0i8; BLOCK];
                let (d, m) = match dtype {
                    GgmlDType::Q8_0 => {
                        for (q, &byte) in codes.iter_mut().zip(&stored[2..]) {
                            *q = byte as i8;
                        }
                        (half(&stored[0..2]), f16::ZERO)
                    }
                    GgmlDType::Q5_0 => {
                        // The fifth bit of code j is bit j of `qh`.
                        let qh = u32::from_le_bytes([stored[2], stored[3], stored[4], stored[5]]);
                        let high = |j: usize| (((qh >> j) & 1) << 4) as u8;
                        for (j, &byte) in stored[6..].iter().enumerate() {
                            codes[j] = ((byte & 0x0f) | high(j)) as i8 - 16;
                            codes[j + 16] = ((byte >> 4) | high(j + 16)) as i8 - 16;
                        }
                        (half(&stored[0..2]), f16::ZERO)
                    }
                    GgmlDType::Q4K => {
                        // Block j of the super-block: the low (even j) or high (odd j)
                        // nibbles of its 64-weight chunk j / 2.
                        let j = b % per_unit;
                        let (sc, min) = k_scale_min(&stored[4..16], j);
                        let nibbles = &stored[16 + 32 * (j / 2)..][..32];
                        for (q, &byte) in codes.iter_mut().zip(nibbles) {
                            *q = if j.is_multiple_of(2) {
                                byte & 0x0f
                            } else {
                                byte >> 4
                            } as i8;
                        }
                        let (d, dmin) = (half(&stored[0..2]), half(&stored[2..4]));
                        (
                            f16::from_f32(d.to_f32() * sc as f32),
                            f16::from_f32(-dmin.to_f32() * min as f32),
                        )
                    }
                    _ => {
                        for (j, &byte) in stored[unit_bytes - 16..].iter().enumerate() {
                            codes[j] = (byte & 0x0f) as i8;
                            codes[j + 16] = (byte >> 4) as i8;
                        }
                        let d = half(&stored[0..2]);
                        match dtype {
                            GgmlDType::Q4_1 => (d, half(&stored[2..4])),
                            _ => (d, f16::from_f32(-8.0 * d.to_f32())),
                        }
                    }
                };
                RowBlock { d, m, codes }
            },
        )))
    }

    /// The rows of `parts` one after the other (stacked q/k/v, gate/up), or `None`
    /// if their formats or inputs differ.
    pub(crate) fn stack(parts: &[&QMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.in_features != first.in_features || p.format != first.format)
        {
            return None;
        }
        let starts: Vec<usize> = parts
            .iter()
            .scan(0, |start, p| {
                let s = *start;
                *start += p.out_features;
                Some(s)
            })
            .collect();
        let out_features = parts.iter().map(|p| p.out_features).sum();
        Some(Self::build(
            first.format,
            out_features,
            first.in_features,
            |row, b| {
                let part = starts.partition_point(|&s| s <= row) - 1;
                parts[part].row_block(row - starts[part], b)
            },
        ))
    }

    /// Lays out the blocks `block(row, b)` gives.
    fn build(
        format: Format,
        out_features: usize,
        in_features: usize,
        block: impl Fn(usize, usize) -> RowBlock,
    ) -> Self {
        let blocks = in_features / BLOCK;
        let tiles = out_features.div_ceil(COLS);
        let bytes = format.tile_block_bytes();
        let mut codes = crate::memory::zeroed_on_huge_pages(tiles * blocks * bytes);
        let mut scales = vec![f16::ZERO; tiles * blocks * COLS];
        let mut offsets = match format {
            Format::U4 => vec![f16::ZERO; tiles * blocks * COLS],
            Format::I8 => vec![],
        };
        for row in 0..out_features {
            let (tile, c) = (row / COLS, row % COLS);
            for b in 0..blocks {
                let RowBlock { d, m, codes: q } = block(row, b);
                let at = tile * blocks + b;
                scales[at * COLS + c] = d;
                let packed = &mut codes[at * bytes..][..bytes];
                for g in 0..4 {
                    for t in 0..4 {
                        let (lo, hi) = (q[4 * g + t] as u8, q[4 * (g + 4) + t] as u8);
                        match format {
                            Format::U4 => packed[g * 64 + c * 4 + t] = lo | hi << 4,
                            Format::I8 => {
                                packed[g * 64 + c * 4 + t] = lo;
                                packed[(g + 4) * 64 + c * 4 + t] = hi;
                            }
                        }
                    }
                }
                if format == Format::U4 {
                    offsets[at * COLS + c] = m;
                }
            }
        }
        Self {
            format,
            out_features,
            in_features,
            blocks,
            codes: Codes::own(codes),
            scales,
            offsets,
        }
    }

    /// Moves the codes of `matrices` (in the order a forward pass reads them) into
    /// shared buffers of at least [`HUGE_PAGE_SHARE`] bytes on transparent huge pages.
    /// A small model's matrices are each smaller than a 2 MiB huge page, so they only
    /// get huge pages together; a decode step streams them all, and with 4 KiB pages
    /// every 64 cache lines cost a TLB miss (BENCHMARKS.md). One buffer at a time is
    /// filled while the matrices' own are freed, so loading peaks at one buffer more.
    pub(crate) fn share_huge_pages(matrices: &mut [&mut QMatrix]) {
        let mut rest = matrices;
        while !rest.is_empty() {
            let mut total = 0;
            let mut n = 0;
            while n < rest.len() && total < HUGE_PAGE_SHARE {
                total += rest[n].codes.len();
                n += 1;
            }
            let (group, tail) = rest.split_at_mut(n);
            rest = tail;
            // A group of one is a matrix of at least `HUGE_PAGE_SHARE` bytes (advised
            // onto huge pages when it was built) or the last matrix alone.
            if group.len() == 1 {
                continue;
            }
            let mut buf = crate::memory::zeroed_on_huge_pages(total);
            let mut ranges = Vec::with_capacity(group.len());
            let mut at = 0;
            for m in group.iter() {
                buf[at..at + m.codes.len()].copy_from_slice(&m.codes);
                ranges.push(at..at + m.codes.len());
                at += m.codes.len();
            }
            let buf = Arc::new(buf);
            for (m, range) in group.iter_mut().zip(ranges) {
                m.codes = Codes::new(Arc::clone(&buf), range);
            }
        }
    }

    /// Block `b` of weight row `row`, as GGUF would give it.
    fn row_block(&self, row: usize, b: usize) -> RowBlock {
        let (tile, c) = (row / COLS, row % COLS);
        let (packed, scales, offsets) = self.tile_block(tile, b);
        let mut codes = [0i8; BLOCK];
        for g in 0..4 {
            for t in 0..4 {
                let byte = packed[g * 64 + c * 4 + t];
                let (lo, hi) = match self.format {
                    Format::U4 => (byte & 0x0f, byte >> 4),
                    Format::I8 => (byte, packed[(g + 4) * 64 + c * 4 + t]),
                };
                codes[4 * g + t] = lo as i8;
                codes[4 * (g + 4) + t] = hi as i8;
            }
        }
        RowBlock {
            d: scales[c],
            m: offsets.get(c).copied().unwrap_or(f16::ZERO),
            codes,
        }
    }

    pub(crate) fn in_features(&self) -> usize {
        self.in_features
    }

    pub(crate) fn out_features(&self) -> usize {
        self.out_features
    }

    /// The bytes one pass over every row reads: codes, scales and offsets.
    pub(crate) fn bytes(&self) -> usize {
        self.codes.len() + size_of::<f16>() * (self.scales.len() + self.offsets.len())
    }

    /// The weights as f32, `(out_features, in_features)`: what the tests hold the
    /// kernels to.
    #[cfg(test)]
    fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let n = self.in_features;
        let mut w = vec![0f32; self.out_features * n];
        for (row, values) in w.chunks_exact_mut(n).enumerate() {
            for (b, values) in values.chunks_exact_mut(BLOCK).enumerate() {
                let RowBlock { d, m, codes } = self.row_block(row, b);
                let (d, m) = (d.to_f32(), m.to_f32());
                for (v, &q) in values.iter_mut().zip(&codes) {
                    *v = d * q as f32 + m;
                }
            }
        }
        Ok(Tensor::from_vec(w, (self.out_features, n), device)?)
    }

    /// `x @ wᵀ` for `x: (rows, in_features)` row-major; returns `(rows, out_features)`.
    pub(crate) fn matmul(&self, x: &[f32], n_rows: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), n_rows * self.in_features);
        thread_local! {
            // Reused: a decode step makes over a hundred products, and allocating and
            // zeroing fresh buffers for each ran while the workers waited. They keep
            // the largest input seen on this thread (a prefill chunk's: about 1 MiB
            // for the default model at 512 tokens).
            static ACTS: RefCell<Activations> = RefCell::default();
        }
        ACTS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut acts) => {
                acts.quantize(x, n_rows, self.in_features);
                self.product(&acts, n_rows)
            }
            // Only a product computed inside another on this thread gets here.
            Err(_) => {
                let mut acts = Activations::default();
                acts.quantize(x, n_rows, self.in_features);
                self.product(&acts, n_rows)
            }
        })
    }

    /// `acts @ wᵀ` for `n_rows` quantized input rows.
    fn product(&self, acts: &Activations, n_rows: usize) -> Vec<f32> {
        // Not zeroed: the items below write every element (the LM head's output is
        // 1.5 MiB a step at batch 8, and zeroing it ran while the workers waited).
        let mut y: Vec<f32> = Vec::with_capacity(n_rows * self.out_features);
        let kernel = Kernel::detect();
        let col_tiles = self.out_features.div_ceil(COLS);
        let row_tiles = n_rows.div_ceil(ROWS);
        let out = SharedOut(y.as_mut_ptr());
        let run = |range: std::ops::Range<usize>| {
            let mut tile = [[0f32; COLS]; ROWS];
            // Column-tile major: a worker's consecutive items reuse the same weights.
            for item in range {
                let (ct, rt) = (item / row_tiles, item % row_tiles);
                let (c0, r0) = (ct * COLS, rt * ROWS);
                let rows = ROWS.min(n_rows - r0);
                kernel.tile(self, acts, TileAt { tile: ct, r0, rows }, &mut tile);
                let cols = COLS.min(self.out_features - c0);
                for (r, values) in tile.iter().enumerate().take(rows) {
                    // SAFETY: row r0 + r, columns c0..c0 + cols are in bounds and
                    // written by this item only.
                    unsafe { out.write((r0 + r) * self.out_features + c0, &values[..cols]) };
                }
            }
        };
        let items = col_tiles * row_tiles;
        // Small products (a short row of one tiny layer) are not worth waking workers.
        if items * self.blocks < 64 {
            run(0..items);
        } else {
            crate::parallel::execute_chunked(items, run);
        }
        // SAFETY: the items (column tile, row tile) cover every row and column once.
        unsafe { y.set_len(n_rows * self.out_features) };
        y
    }

    /// Codes, scales and offsets (none for [`Format::I8`]) of block `b` of tile `tile`.
    // Inlined into the kernels' block loops: as a call, it made every block spill and
    // reload the accumulators.
    #[inline(always)]
    fn tile_block(&self, tile: usize, b: usize) -> (&[u8], &[f16], &[f16]) {
        let at = tile * self.blocks + b;
        let bytes = self.format.tile_block_bytes();
        let offsets = match self.format {
            Format::U4 => &self.offsets[at * COLS..][..COLS],
            Format::I8 => &[],
        };
        (
            &self.codes[at * bytes..][..bytes],
            &self.scales[at * COLS..][..COLS],
            offsets,
        )
    }
}

/// The 6-bit scale and min of block `j` (< 8) of a Q4_K super-block, from its 12
/// packed bytes: blocks 0-3 in the low 6 bits of bytes 0-7, blocks 4-7 in the nibbles
/// of bytes 8-11 with their top 2 bits in the top bits of bytes 0-7.
fn k_scale_min(packed: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint elements (see `matmul`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i..i + values.len()` is in bounds, and no other thread touches it.
    unsafe fn write(self, i: usize, values: &[f32]) {
        let to = self.0.add(i);
        match <&[f32; COLS]>::try_from(values) {
            // A whole tile row is one vector store; a copy of run-time length is a
            // call to `memmove` (3% of a batch-8 decode step, over 100k calls).
            Ok(row) => to.cast::<[f32; COLS]>().write_unaligned(*row),
            Err(_) => std::ptr::copy_nonoverlapping(values.as_ptr(), to, values.len()),
        }
    }
}

/// Input rows quantized per block of 32: `x ≈ da * qa`, `Σ qa`, and `sa = da * Σ qa`.
#[derive(Default)]
struct Activations {
    blocks: usize,
    codes: Lines,
    scales: Lines,
    code_sums: Lines,
    sums: Lines,
}

impl Activations {
    /// Quantizes `x` (`rows × in_features`) into these buffers, reusing their memory.
    fn quantize(&mut self, x: &[f32], rows: usize, in_features: usize) {
        let blocks = in_features / BLOCK;
        self.blocks = blocks;
        let n = rows * blocks;
        let out = Blocks {
            codes: self.codes.first_mut(rows * in_features),
            scales: self.scales.first_mut(n),
            code_sums: self.code_sums.first_mut(n),
            sums: self.sums.first_mut(n),
        };
        match Kernel::detect() {
            Kernel::Scalar => out.quantize(x),
            // SAFETY: every x86 kernel but the scalar one needs AVX2.
            #[cfg(target_arch = "x86_64")]
            _ => unsafe { x86::quantize(x, out) },
        }
    }

    #[inline(always)]
    fn row(&self, r: usize) -> Row<'_> {
        let blocks = r * self.blocks..(r + 1) * self.blocks;
        Row {
            codes: &self.codes.all()[r * self.blocks * BLOCK..(r + 1) * self.blocks * BLOCK],
            scales: &self.scales.all()[blocks.clone()],
            code_sums: &self.code_sums.all()[blocks.clone()],
            sums: &self.sums.all()[blocks],
        }
    }
}

/// A buffer on cache lines of its own. The quantized activations are written by one
/// thread and read by every worker; in plain `Vec`s, sharing lines with whatever the
/// allocator put next to them, the quantizer's stores waited on those lines (its share
/// of the engine thread in a batch-8 decode profile: 11%, here 3%).
#[derive(Default)]
struct Lines(Vec<Line>);

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

// SAFETY: 64 plain bytes, no padding, any bit pattern valid.
unsafe impl bytemuck::Zeroable for Line {}
unsafe impl bytemuck::Pod for Line {}

impl Lines {
    /// The first `len` elements, growing the buffer (never shrinking it) to hold them.
    fn first_mut<T: bytemuck::Pod>(&mut self, len: usize) -> &mut [T] {
        let lines = (len * size_of::<T>()).div_ceil(size_of::<Line>());
        if self.0.len() < lines {
            self.0.resize(lines, Line([0; 64]));
        }
        &mut bytemuck::cast_slice_mut(&mut self.0)[..len]
    }

    fn all<T: bytemuck::Pod>(&self) -> &[T] {
        bytemuck::cast_slice(&self.0)
    }
}

/// The quantized blocks of [`Activations`] being written, one entry per block of 32.
struct Blocks<'a> {
    codes: &'a mut [i8],
    scales: &'a mut [f32],
    code_sums: &'a mut [i32],
    sums: &'a mut [f32],
}

impl Blocks<'_> {
    /// As llama.cpp's `quantize_row_q8_0`: `d = max |x| / 127`, `q = round(x / d)`
    /// (ties to even), and here also `Σ q` and `d Σ q`. In three passes, each vectorised
    /// within a block or across blocks: done block by block, the two divisions of a
    /// scale sat between its maximum and its codes, a chain of latencies every block
    /// waited for.
    fn quantize(mut self, x: &[f32]) {
        for (values, amax) in x.chunks_exact(BLOCK).zip(self.scales.iter_mut()) {
            *amax = block_amax(values);
        }
        self.divide();
        for (((values, q), (&d, sum)), code_sum) in x
            .chunks_exact(BLOCK)
            .zip(self.codes.chunks_exact_mut(BLOCK))
            .zip(self.scales.iter().zip(self.sums.iter_mut()))
            .zip(self.code_sums.iter_mut())
        {
            let total = block_codes(values, *sum, q);
            *code_sum = total;
            *sum = d * total as f32;
        }
    }

    /// Turns the maxima in `scales` into scales, and puts their inverses in `sums`
    /// (which the last pass replaces).
    #[inline(always)]
    fn divide(&mut self) {
        for (d, inv) in self.scales.iter_mut().zip(self.sums.iter_mut()) {
            *d /= 127.0;
            *inv = if *d > 0.0 { 1.0 / *d } else { 0.0 };
        }
    }
}

/// The largest |x| of a block. Written as eight-lane arrays so that every step
/// vectorises; from the bits, since non-negative floats order as their bits do and
/// integer maxima vectorise where float ones (with their NaN rule) stayed scalar. A
/// NaN is skipped, as `f32::max` skips it.
#[inline(always)]
fn block_amax(values: &[f32]) -> f32 {
    let mut lanes = [0u32; 8];
    for chunk in values.chunks_exact(8) {
        lanes = std::array::from_fn(|l| {
            let bits = chunk[l].abs().to_bits();
            lanes[l].max(if bits > f32::INFINITY.to_bits() {
                0
            } else {
                bits
            })
        });
    }
    f32::from_bits(lanes.into_iter().max().unwrap_or(0))
}

/// `q = round(x * inv)` clamped to ±127 (a NaN becomes -127), rounding ties to even as
/// llama.cpp's SIMD paths do; returns `Σ q`. Adding 1.5 * 2^23 leaves round(x) + 2^22
/// in the low mantissa bits for |x| <= 2^22: every step vectorises, where a
/// float-to-int `as` would not (and the codes' sum over 32 values did not).
#[inline(always)]
fn block_codes(values: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    let mut acc = [0i32; 8];
    for (chunk, q) in values.chunks_exact(8).zip(q.chunks_exact_mut(8)) {
        let codes: [i32; 8] = std::array::from_fn(|l| {
            // Not `clamp`, which keeps NaN.
            #[allow(clippy::manual_clamp)]
            let x = (chunk[l] * inv).max(-127.0).min(127.0);
            (x + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
        });
        for l in 0..8 {
            q[l] = codes[l] as i8;
            acc[l] += codes[l];
        }
    }
    acc.iter().sum()
}

/// One quantized input row: `qa`, `da`, `Σ qa` and `sa` per block.
#[derive(Clone, Copy)]
struct Row<'a> {
    codes: &'a [i8],
    scales: &'a [f32],
    code_sums: &'a [i32],
    sums: &'a [f32],
}

/// Where a tile sits: output columns `16 tile..16 (tile + 1)`, input rows `r0..r0 + rows`.
#[derive(Clone, Copy, Debug)]
struct TileAt {
    tile: usize,
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

    /// `out[r][c] = y[at.r0 + r, 16 at.tile + c]` for `r < at.rows`.
    fn tile(self, w: &QMatrix, a: &Activations, at: TileAt, out: &mut [[f32; COLS]; ROWS]) {
        let i8 = w.format == Format::I8;
        match self {
            Kernel::Scalar => scalar_tile(w, a, at, out),
            // SAFETY: `detect`/`available` chose these only where the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 if i8 => unsafe { x86::avx2_tile::<true>(w, a, at, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::avx2_tile::<false>(w, a, at, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni if i8 => unsafe { x86::avx512_tile::<true>(w, a, at, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::avx512_tile::<false>(w, a, at, out) },
        }
    }
}

/// The reference kernel: the formula of the module docs, one value at a time.
fn scalar_tile(w: &QMatrix, a: &Activations, at: TileAt, out: &mut [[f32; COLS]; ROWS]) {
    let TileAt { tile, r0, rows } = at;
    for (r, values) in out.iter_mut().enumerate().take(rows) {
        let Row {
            codes: qa,
            scales: da,
            sums: sa,
            ..
        } = a.row(r0 + r);
        for (c, v) in values.iter_mut().enumerate() {
            let row = tile * COLS + c;
            *v = 0.0;
            if row >= w.out_features {
                continue;
            }
            for b in 0..w.blocks {
                let RowBlock { d, m, codes } = w.row_block(row, b);
                let qa = &qa[b * BLOCK..(b + 1) * BLOCK];
                let dot: i32 = codes
                    .iter()
                    .zip(qa)
                    .map(|(&q, &x)| q as i32 * x as i32)
                    .sum();
                *v += d.to_f32() * da[b] * dot as f32 + m.to_f32() * sa[b];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Activations, Blocks, QMatrix, Row, TileAt, BLOCK, COLS, PREFETCH_BLOCKS, ROWS};

    /// [`Blocks::quantize`] in AVX2, to the bit: the vector maximum skips NaN as
    /// `f32::max` does (`max(a, b)` returns `b` when `a` is NaN), a NaN code clamps to
    /// -127 the same way, and the conversion rounds ties to even (the default MXCSR).
    /// Written out because the compiler's vectorisation of the portable passes
    /// depended on where they were inlined (4 lanes and shuffles in the engine).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(x: &[f32], mut out: Blocks<'_>) {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (values, amax) in x.chunks_exact(BLOCK).zip(out.scales.iter_mut()) {
            let p = values.as_ptr();
            let mut m = _mm256_setzero_ps();
            for k in 0..BLOCK / 8 {
                m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p.add(8 * k)), abs), m);
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            *amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        }
        out.divide();
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        // packs interleave 128-bit lanes; this puts the 4-byte groups back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (((values, q), (&d, sum)), code_sum) in x
            .chunks_exact(BLOCK)
            .zip(out.codes.chunks_exact_mut(BLOCK))
            .zip(out.scales.iter().zip(out.sums.iter_mut()))
            .zip(out.code_sums.iter_mut())
        {
            let (p, inv) = (values.as_ptr(), _mm256_set1_ps(*sum));
            let mut c = [_mm256_setzero_si256(); BLOCK / 8];
            for (k, c) in c.iter_mut().enumerate() {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * k)), inv);
                *c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
            }
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(c[0], c[1]),
                _mm256_packs_epi32(c[2], c[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
            let t = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
            let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
            let t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
            let total = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32::<1>(t)));
            *code_sum = total;
            *sum = d * total as f32;
        }
    }

    /// Asks for the codes [`PREFETCH_BLOCKS`] blocks after block `b` of `tile` (in the
    /// next tile near a tile's end) to be brought into cache.
    #[inline(always)]
    unsafe fn prefetch_ahead(w: &QMatrix, tile: usize, b: usize) {
        let bytes = w.format.tile_block_bytes();
        let at = (tile * w.blocks + b + PREFETCH_BLOCKS) * bytes;
        if at < w.codes.len() {
            let ahead = w.codes.as_ptr().add(at);
            for line in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.add(line) as *const i8);
            }
        }
    }

    /// Four activation bytes `4 g..4 g + 4` of a block, in every 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn group(qa: *const i8, g: usize) -> i32 {
        (qa.add(4 * g) as *const i32).read_unaligned()
    }

    /// `I8`: 8-bit codes (the sign trick: `|q| · (qa · sign q)`), else 4-bit ones.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2_tile<const I8: bool>(
        w: &QMatrix,
        a: &Activations,
        at: TileAt,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        let TileAt { tile, r0, rows } = at;
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        // Eight columns (one ymm of i32) and four rows at a time fit the 16 registers.
        for half in 0..2 {
            for r in (0..rows).step_by(4) {
                let n = (rows - r).min(4);
                let mut acc = [_mm256_setzero_ps(); 4];
                for b in 0..w.blocks {
                    if half == 0 && r == 0 {
                        prefetch_ahead(w, tile, b);
                    }
                    let (codes, scales, offsets) = w.tile_block(tile, b);
                    // Unsigned multiplicands; for 8-bit codes, the codes themselves
                    // give the signs to move onto the activations.
                    let mut q = [_mm256_setzero_si256(); 8];
                    let mut signed = [_mm256_setzero_si256(); 8];
                    let at = |g: usize| codes.as_ptr().add(g * 64 + half * 32) as *const __m256i;
                    if I8 {
                        for g in 0..8 {
                            signed[g] = _mm256_loadu_si256(at(g));
                            q[g] = _mm256_abs_epi8(signed[g]);
                        }
                    } else {
                        for g in 0..4 {
                            let raw = _mm256_loadu_si256(at(g));
                            q[g] = _mm256_and_si256(raw, low);
                            q[g + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                        }
                    }
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(
                        scales.as_ptr().add(half * 8) as *const __m128i
                    ));
                    for (i, acc) in acc.iter_mut().enumerate().take(n) {
                        let row = a.row(r0 + r + i);
                        let (da, sa) = (row.scales, row.sums);
                        let qa = row.codes.as_ptr().add(b * BLOCK);
                        let mut dot = _mm256_setzero_si256();
                        for g in 0..8 {
                            let mut x = _mm256_set1_epi32(group(qa, g));
                            if I8 {
                                x = _mm256_sign_epi8(x, signed[g]);
                            }
                            // |q| ≤ 127 and |qa| ≤ 127: the i16 pair sums cannot saturate.
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[g], x), ones);
                            dot = _mm256_add_epi32(dot, p);
                        }
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(da[b]));
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, *acc);
                        if !I8 {
                            let m = _mm256_cvtph_ps(_mm_loadu_si128(
                                offsets.as_ptr().add(half * 8) as *const __m128i,
                            ));
                            *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(sa[b]), *acc);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate().take(n) {
                    _mm256_storeu_ps(out[r + i].as_mut_ptr().add(half * 8), *acc);
                }
            }
        }
    }

    /// `I8`: 8-bit codes (read as `q + 128`; each block's sum starts from
    /// `-128 Σ qa`), else 4-bit ones.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn avx512_tile<const I8: bool>(
        w: &QMatrix,
        a: &Activations,
        at: TileAt,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        // A row count known at compile time keeps every row's sums in registers, and
        // the rows' chains of dot products independent of each other.
        match at.rows {
            1 => avx512_rows::<I8, 1>(w, a, at, out),
            2 => avx512_rows::<I8, 2>(w, a, at, out),
            3 => avx512_rows::<I8, 3>(w, a, at, out),
            4 => avx512_rows::<I8, 4>(w, a, at, out),
            5 => avx512_rows::<I8, 5>(w, a, at, out),
            6 => avx512_rows::<I8, 6>(w, a, at, out),
            7 => avx512_rows::<I8, 7>(w, a, at, out),
            _ => avx512_rows::<I8, ROWS>(w, a, at, out),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn avx512_rows<const I8: bool, const R: usize>(
        w: &QMatrix,
        a: &Activations,
        at: TileAt,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        let TileAt { tile, r0, .. } = at;
        let low = _mm512_set1_epi8(0x0f);
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [_mm512_setzero_ps(); R];
        let rows: [Row<'_>; R] = std::array::from_fn(|r| a.row(r0 + r));
        for b in 0..w.blocks {
            prefetch_ahead(w, tile, b);
            let (codes, scales, offsets) = w.tile_block(tile, b);
            let at = |g: usize| codes.as_ptr().add(g * 64) as *const __m512i;
            let mut q = [_mm512_setzero_si512(); 8];
            if I8 {
                for (g, q) in q.iter_mut().enumerate() {
                    *q = _mm512_xor_si512(_mm512_loadu_si512(at(g)), flip);
                }
            } else {
                for g in 0..4 {
                    let raw = _mm512_loadu_si512(at(g));
                    q[g] = _mm512_and_si512(raw, low);
                    q[g + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                }
            }
            let qa: [*const i8; R] = std::array::from_fn(|r| rows[r].codes.as_ptr().add(b * BLOCK));
            let mut dot: [__m512i; R] = std::array::from_fn(|r| match I8 {
                true => _mm512_set1_epi32(-128 * rows[r].code_sums[b]),
                false => _mm512_setzero_si512(),
            });
            for (g, &q) in q.iter().enumerate() {
                for r in 0..R {
                    dot[r] = _mm512_dpbusd_epi32(dot[r], q, _mm512_set1_epi32(group(qa[r], g)));
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(scales.as_ptr() as *const __m256i));
            for r in 0..R {
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(rows[r].scales[b]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), scale, acc[r]);
            }
            if !I8 {
                let m = _mm512_cvtph_ps(_mm256_loadu_si256(offsets.as_ptr() as *const __m256i));
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(rows[r].sums[b]), acc[r]);
                }
            }
        }
        for (out, acc) in out.iter_mut().zip(&acc) {
            _mm512_storeu_ps(out.as_mut_ptr(), *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::{Device, Tensor};

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
    /// accumulation), over shapes with partial tiles and row tails.
    #[test]
    fn kernels_match_the_dequantized_product() -> Result<()> {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
        ] {
            // Q4_K needs rows of 256; the others also get an odd block count (3).
            let odd = (dtype != GgmlDType::Q4K).then_some((13, 96, 3));
            let shapes = [(8, 256, 1), (13, 512, 3), (192, 768, 8), (37, 1536, 11)];
            // Every row count a tile can have.
            let rows = [2, 4, 5, 6, 7].map(|n| (24, 256, n));
            for (out_f, in_f, n_rows) in shapes.into_iter().chain(rows).chain(odd) {
                let w = Tensor::from_vec(random(out_f * in_f, 1), (out_f, in_f), &Device::Cpu)?;
                let q = QTensor::quantize(&w, dtype)?;
                let m = QMatrix::from_qtensor(&q)?.expect("blocks it reads");
                let dense = m.dequantize(&Device::Cpu)?;
                let reference = q.dequantize(&Device::Cpu)?;
                let diff = (&dense - &reference)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                // Q4_K's block scales and offsets are rounded to f16 (see `from_qtensor`):
                // |Δw| <= 2⁻¹¹ (|d sc| 15 + |dmin m|), where |d sc| 15 is the block's
                // range (at most 2 max |w|) and |dmin m| its minimum (at most max |w|).
                let allowed = match dtype {
                    GgmlDType::Q4K => {
                        let max = reference.abs()?.max_all()?.to_scalar::<f32>()?;
                        3.0 * max / 2048.0
                    }
                    _ => 0.0,
                };
                assert!(
                    diff <= allowed,
                    "{dtype:?}: dequantization differs from candle's by {diff} (allowed {allowed})"
                );

                let wd: Vec<f32> = dense.flatten_all()?.to_vec1()?;
                let x = random(n_rows * in_f, 2);
                let mut acts = Activations::default();
                acts.quantize(&x, n_rows, in_f);
                let mut expected = vec![0f64; n_rows * out_f];
                for r in 0..n_rows {
                    let Row {
                        codes: qa,
                        scales: da,
                        ..
                    } = acts.row(r);
                    for c in 0..out_f {
                        expected[r * out_f + c] = (0..in_f)
                            .map(|i| wd[c * in_f + i] as f64 * qa[i] as f64 * da[i / BLOCK] as f64)
                            .sum();
                    }
                }
                for kernel in Kernel::available() {
                    let mut got = vec![0f32; n_rows * out_f];
                    let mut tile = [[0f32; COLS]; ROWS];
                    for t in 0..out_f.div_ceil(COLS) {
                        for r0 in (0..n_rows).step_by(ROWS) {
                            let rows = ROWS.min(n_rows - r0);
                            kernel.tile(&m, &acts, TileAt { tile: t, r0, rows }, &mut tile);
                            for r in 0..rows {
                                for c in 0..COLS.min(out_f - t * COLS) {
                                    got[(r0 + r) * out_f + t * COLS + c] = tile[r][c];
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

    /// The activations' blocks as llama.cpp's `quantize_row_q8_0` computes them (ties
    /// to even), one value at a time, for buffers reused across shrinking and growing
    /// inputs, and for blocks of zeros, ties, NaN and infinity; the portable passes and
    /// the SIMD ones alike.
    #[test]
    fn activations_quantize_value_by_value() {
        let mut special = vec![0f32; 4 * BLOCK];
        // Block 1: amax 127 makes d = 1, so the ties below stay ties.
        special[BLOCK..2 * BLOCK].copy_from_slice(&random(BLOCK, 3));
        special[BLOCK] = 127.0;
        special[BLOCK + 1] = 2.5;
        special[BLOCK + 2] = -3.5;
        special[BLOCK + 3] = 0.5;
        special[2 * BLOCK + 5] = f32::NAN;
        special[2 * BLOCK + 6] = 1.0;
        special[3 * BLOCK + 7] = f32::INFINITY;
        let mut acts = Activations::default();
        for (rows, in_f, x) in [
            (8, 1536, random(8 * 1536, 4)),
            (3, 96, random(3 * 96, 5)),
            (1, 4 * BLOCK, special),
            (5, 576, random(5 * 576, 6)),
        ] {
            acts.quantize(&x, rows, in_f);
            for r in 0..rows {
                let row = acts.row(r);
                for b in 0..in_f / BLOCK {
                    let values = &x[(r * in_f + b * BLOCK)..][..BLOCK];
                    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                    let codes: Vec<i8> = values
                        .iter()
                        // Not `clamp`, which keeps NaN (llama.cpp's code gives -127).
                        .map(|v| {
                            #[allow(clippy::manual_clamp)]
                            let x = (v * inv).max(-127.0).min(127.0);
                            x.round_ties_even() as i8
                        })
                        .collect();
                    let sum: i32 = codes.iter().map(|&q| q as i32).sum();
                    let at = format!("rows {rows} x {in_f}, row {r}, block {b}");
                    assert_eq!(&row.codes[b * BLOCK..][..BLOCK], &codes[..], "{at}");
                    assert_eq!(row.scales[b].to_bits(), d.to_bits(), "{at}");
                    assert_eq!(row.code_sums[b], sum, "{at}");
                    assert_eq!(row.sums[b].to_bits(), (d * sum as f32).to_bits(), "{at}");
                }
            }
            // The portable passes, whichever path `quantize` took on this CPU.
            let n = rows * in_f / BLOCK;
            let (mut codes, mut scales) = (vec![0; rows * in_f], vec![0.0; n]);
            let (mut code_sums, mut sums) = (vec![0; n], vec![0.0; n]);
            Blocks {
                codes: &mut codes,
                scales: &mut scales,
                code_sums: &mut code_sums,
                sums: &mut sums,
            }
            .quantize(&x);
            assert_eq!(codes, acts.codes.all::<i8>()[..rows * in_f]);
            assert_eq!(code_sums, acts.code_sums.all::<i32>()[..n]);
            for (a, b) in [
                (&scales, acts.scales.all::<f32>()),
                (&sums, acts.sums.all()),
            ] {
                assert!(a
                    .iter()
                    .zip(b.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
            if in_f == 4 * BLOCK {
                let row = acts.row(0);
                assert_eq!(row.codes[BLOCK + 1..BLOCK + 4], [2, -4, 0], "ties to even");
                assert_eq!(row.codes[2 * BLOCK + 5], -127, "NaN");
                assert_eq!(row.scales[3], f32::INFINITY);
            }
        }
    }

    #[test]
    fn q4k_scales_outside_f16s_normal_range_are_left_to_candle() -> Result<()> {
        use candle_core::quantized::QStorage;
        use std::borrow::Cow;
        // One row of 256: super-block scale d and min dmin, every block's 6-bit sc = 1
        // and m = `m` (packed as GGUF packs them), codes 0..15.
        let read = |d: f32, dmin: f32, m: u8| -> Result<bool> {
            let mut block = Vec::with_capacity(144);
            block.extend(f16::from_f32(d).to_le_bytes());
            block.extend(f16::from_f32(dmin).to_le_bytes());
            block.extend([1, 1, 1, 1, m, m, m, m]);
            block.extend([1 | m << 4; 4]);
            block.extend((0..128).map(|i| (i % 16) as u8 | ((15 - i % 16) as u8) << 4));
            let storage = QStorage::from_data(Cow::Owned(block), &Device::Cpu, GgmlDType::Q4K)?;
            let q = QTensor::new(storage, (1, 256))?;
            Ok(QMatrix::from_qtensor(&q)?.is_some())
        };
        assert!(read(1e-3, 1e-3, 1)?);
        assert!(read(1e-3, 0.0, 0)?, "a zero min is exact");
        // d · sc near 1e-6, subnormal in f16, where rounding would cost percents.
        assert!(!read(1e-6, 0.0, 0)?);
        // Normal scales, but dmin · m near 1e-6.
        assert!(!read(1e-3, 1e-6, 1)?);
        Ok(())
    }

    /// Matrices whose codes moved into one shared buffer compute what they computed
    /// before, each from its own range.
    #[test]
    fn shared_codes_keep_each_matrix() -> Result<()> {
        let (in_f, n_rows) = (256, 3);
        let read = |rows: usize, seed: u64, dtype| -> Result<QMatrix> {
            let w = Tensor::from_vec(random(rows * in_f, seed), (rows, in_f), &Device::Cpu)?;
            Ok(QMatrix::from_qtensor(&QTensor::quantize(&w, dtype)?)?.expect("readable"))
        };
        let mut ms = [
            read(40, 1, GgmlDType::Q4_1)?,
            read(17, 2, GgmlDType::Q8_0)?,
            read(64, 3, GgmlDType::Q4_0)?,
        ];
        let x = random(n_rows * in_f, 9);
        let before: Vec<Vec<f32>> = ms.iter().map(|m| m.matmul(&x, n_rows)).collect();
        let codes_before: Vec<Vec<u8>> = ms.iter().map(|m| m.codes.to_vec()).collect();
        QMatrix::share_huge_pages(&mut ms.iter_mut().collect::<Vec<_>>());
        assert!(ms
            .windows(2)
            .all(|w| Arc::ptr_eq(&w[0].codes._buf, &w[1].codes._buf)));
        for (i, m) in ms.iter().enumerate() {
            assert_eq!(*m.codes, codes_before[i][..], "matrix {i}'s codes");
            assert_eq!(m.matmul(&x, n_rows), before[i], "matrix {i}'s product");
        }
        Ok(())
    }

    /// The threaded product approximates the f32 product within the 8-bit activation
    /// quantization's error, and stacking keeps each part's rows.
    #[test]
    fn stacked_matmul_approximates_the_dense_product() -> Result<()> {
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
        ] {
            stacked_matmul(dtype)?;
        }
        Ok(())
    }

    fn stacked_matmul(dtype: GgmlDType) -> Result<()> {
        let (in_f, n_rows) = (512, 6);
        let read = |rows: usize, seed: u64| -> Result<QMatrix> {
            let w = Tensor::from_vec(random(rows * in_f, seed), (rows, in_f), &Device::Cpu)?;
            Ok(QMatrix::from_qtensor(&QTensor::quantize(&w, dtype)?)?.expect("readable"))
        };
        let (top, bottom) = (read(50, 3)?, read(81, 5)?);
        let m = QMatrix::stack(&[&top, &bottom]).expect("same input width");
        let parts = Tensor::cat(
            &[
                top.dequantize(&Device::Cpu)?,
                bottom.dequantize(&Device::Cpu)?,
            ],
            0,
        )?;
        let diff = (m.dequantize(&Device::Cpu)? - parts)?.abs()?.max_all()?;
        assert_eq!(
            diff.to_scalar::<f32>()?,
            0.0,
            "{dtype:?}: stacking moved rows"
        );
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
