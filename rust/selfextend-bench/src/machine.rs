//! What the machine itself can do, measured: the f32 FMA peak of its cores, their 8-bit
//! multiply-add peak (quantized layers multiply 8-bit activations by 4/8-bit codes with
//! the instructions measured here), and the rate at which they read memory. The
//! benchmark reports prefill against the first two (prefill is compute-bound) and
//! decode against the third (decode reads every weight and the whole KV cache once per
//! token).

use std::hint::black_box;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    /// The vector instructions the peak was measured with.
    pub(crate) isa: &'static str,
    pub(crate) threads: usize,
    /// f32 FLOP/s of fused multiply-adds on every thread at once (an FMA is 2 FLOPs).
    pub(crate) fma_peak_flops: f64,
    /// 8-bit multiply-adds per second, as 2 ops each, with what the quantized kernels
    /// use here (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw` + `vpmaddwd`); `None`
    /// without either.
    pub(crate) int8_isa: Option<&'static str>,
    pub(crate) int8_peak_ops: Option<f64>,
    /// Bytes/s every thread at once reads from a buffer far larger than the caches.
    pub(crate) read_bytes_per_second: f64,
}

/// Measures both on `threads` threads; takes a few seconds.
pub(crate) fn measure(threads: usize) -> Machine {
    let (isa, fma_peak_flops) = fma_peak(threads);
    let int8 = int8_peak(threads);
    Machine {
        isa,
        threads,
        fma_peak_flops,
        int8_isa: int8.map(|(isa, _)| isa),
        int8_peak_ops: int8.map(|(_, ops)| ops),
        read_bytes_per_second: read_bandwidth(threads),
    }
}

/// Independent accumulator chains per thread: enough to cover FMA latency (4-5
/// cycles) on two FMA pipes.
const CHAINS: usize = 12;

fn fma_peak(threads: usize) -> (&'static str, f64) {
    let (isa, lanes, kernel): (_, usize, fn(usize) -> f32) = pick_kernel();
    let (rounds, seconds) = on_every_thread(threads, kernel);
    (
        isa,
        (threads * rounds * CHAINS * lanes * 2) as f64 / seconds,
    )
}

fn int8_peak(threads: usize) -> Option<(&'static str, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        // The quantized kernel's choice (`qmatrix::Kernel::available`).
        let (isa, macs, kernel): (_, usize, fn(usize) -> f32) =
            if ["avx512f", "avx512bw", "avx512vnni"]
                .iter()
                .all(|f| detected(f))
            {
                // SAFETY (both closures): called only where the CPU reports the features.
                ("AVX-512 VNNI", 64, |n| unsafe { x86::int8_vnni(n) })
            } else if ["avx2", "fma", "f16c"].iter().all(|f| detected(f)) {
                ("AVX2", 32, |n| unsafe { x86::int8_avx2(n) })
            } else {
                return None;
            };
        let (rounds, seconds) = on_every_thread(threads, kernel);
        Some((isa, (threads * rounds * CHAINS * macs * 2) as f64 / seconds))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

/// `SELFEXTEND_NO_AVX512=1` makes the quantized kernels skip AVX-512, so the peaks they
/// are measured against skip it too.
#[cfg(target_arch = "x86_64")]
fn detected(feature: &str) -> bool {
    let avx512 = std::env::var_os("SELFEXTEND_NO_AVX512").is_none();
    match feature {
        "avx512f" => avx512 && is_x86_feature_detected!("avx512f"),
        "avx512bw" => avx512 && is_x86_feature_detected!("avx512bw"),
        "avx512vnni" => avx512 && is_x86_feature_detected!("avx512vnni"),
        "avx2" => is_x86_feature_detected!("avx2"),
        "fma" => is_x86_feature_detected!("fma"),
        "f16c" => is_x86_feature_detected!("f16c"),
        _ => false,
    }
}

/// `kernel(rounds)` on `threads` threads at once, with `rounds` grown until a run
/// takes a tenth of a second: `(rounds, the fastest of three runs in seconds)`.
fn on_every_thread(threads: usize, kernel: fn(usize) -> f32) -> (usize, f64) {
    let run = |rounds: usize| {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(move || black_box(kernel(black_box(rounds))));
            }
        });
        start.elapsed().as_secs_f64()
    };
    let mut rounds = 1 << 16;
    while run(rounds) < 0.1 {
        rounds *= 4;
    }
    (rounds, best_of(3, || run(rounds)))
}

#[cfg(target_arch = "x86_64")]
fn pick_kernel() -> (&'static str, usize, fn(usize) -> f32) {
    if detected("avx512f") {
        // SAFETY (both closures): called only where the CPU reports the features.
        return ("AVX-512", 16, |n| unsafe { x86::fma_avx512(n) });
    }
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return ("AVX2+FMA", 8, |n| unsafe { x86::fma_avx2(n) });
    }
    ("scalar", 1, fma_scalar)
}

#[cfg(not(target_arch = "x86_64"))]
fn pick_kernel() -> (&'static str, usize, fn(usize) -> f32) {
    ("scalar", 1, fma_scalar)
}

fn fma_scalar(rounds: usize) -> f32 {
    let mut acc = [1f32; CHAINS];
    for _ in 0..rounds {
        for a in &mut acc {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::CHAINS;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_avx512(rounds: usize) -> f32 {
        let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_avx2(rounds: usize) -> f32 {
        let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let mut lanes = [0f32; 8];
        let mut sum = 0.0;
        for a in acc {
            _mm256_storeu_ps(lanes.as_mut_ptr(), a);
            sum += lanes.iter().sum::<f32>();
        }
        sum
    }

    /// 64 unsigned × signed 8-bit products summed into 16 i32 lanes per instruction.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn int8_vnni(rounds: usize) -> f32 {
        let (a, b) = (_mm512_set1_epi8(3), _mm512_set1_epi8(-2));
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..rounds {
            for x in &mut acc {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_epi32(x) as f32).sum()
    }

    /// 32 products per `vpmaddubsw` (pairs summed to i16), widened to i32 by `vpmaddwd`
    /// and accumulated: the AVX2 kernel's sequence.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn int8_avx2(rounds: usize) -> f32 {
        let (b, ones) = (_mm256_set1_epi8(-2), _mm256_set1_epi16(1));
        let codes: [__m256i; CHAINS] = std::array::from_fn(|i| _mm256_set1_epi8(i as i8 + 1));
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        for _ in 0..rounds {
            // Loaded each round, as the kernel loads its codes: otherwise the products
            // of constant operands would be hoisted out of the loop.
            let codes = super::black_box(codes);
            for (x, &a) in acc.iter_mut().zip(&codes) {
                let pairs = _mm256_maddubs_epi16(a, b);
                *x = _mm256_add_epi32(*x, _mm256_madd_epi16(pairs, ones));
            }
        }
        let mut lanes = [0i32; 8];
        let mut sum = 0.0;
        for x in acc {
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), x);
            sum += lanes.iter().map(|&l| l as f32).sum::<f32>();
        }
        sum
    }
}

/// Per thread; together far beyond any last-level cache.
const READ_BYTES_PER_THREAD: usize = 256 << 20;

fn read_bandwidth(threads: usize) -> f64 {
    let buffers: Vec<Vec<f32>> = (0..threads)
        .map(|t| vec![t as f32 + 1.0; READ_BYTES_PER_THREAD / 4])
        .collect();
    let best = best_of(5, || {
        let start = Instant::now();
        std::thread::scope(|s| {
            for buffer in &buffers {
                s.spawn(|| black_box(sum(buffer)));
            }
        });
        start.elapsed().as_secs_f64()
    });
    (threads * READ_BYTES_PER_THREAD) as f64 / best
}

/// Thirty-two lanes of partial sums, so the loop vectorises and the adds never wait.
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    for chunk in xs.chunks_exact(32) {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum()
}

fn best_of(repeats: usize, mut run: impl FnMut() -> f64) -> f64 {
    (0..repeats).map(|_| run()).fold(f64::INFINITY, f64::min)
}
