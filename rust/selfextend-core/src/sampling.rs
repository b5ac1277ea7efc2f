//! Next-token selection: greedy, or temperature / top-k / top-p sampling with a
//! repetition penalty, in the order `transformers` applies them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// `0.0` is greedy decoding.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// CTRL-style penalty on tokens already in the sequence; `1.0` is off.
    pub repetition_penalty: f64,
    /// Seeds the sampler; `None` draws a seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("top_k", "must be >= 1 (or None to disable)"));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid(
                    "top_p",
                    format!("must be in (0, 1], got {p}"),
                ));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::invalid(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, got {}",
                    self.repetition_penalty
                ),
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { params, rng })
    }

    /// Picks the next id from `logits` (modified in place); `history` is every id in
    /// the sequence so far, for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let penalty = self.params.repetition_penalty as f32;
        if penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &id in history {
                if let Some(s) = seen.get_mut(id as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[id as usize];
                        *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
                    }
                }
            }
        }
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.params.top_k {
            candidates.truncate(k.max(1));
        }
        // softmax(l / T) as exp((l - max) / T): the temperature divides differences
        // that are <= 0, so a tiny one tends to greedy instead of overflowing to NaN.
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&(_, l)| ((l - max) as f64 / self.params.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.params.top_p {
            // Keep the smallest prefix whose mass reaches top_p (always at least one).
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    mass += p;
                    mass >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            candidates.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (&(id, _), &p) in candidates.iter().zip(&probs) {
            if r < p {
                return id;
            }
            r -= p;
        }
        candidates[candidates.len() - 1].0
    }
}

/// Index of the largest value; the first on ties, NaN never wins.
pub fn argmax(xs: &[f32]) -> u32 {
    // The maximum lane by lane (vectorised; NaN is never greater), then its first
    // index: two passes over a vocabulary beat one with a branch per element.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max > f32::NEG_INFINITY {
        if let Some(i) = xs.iter().position(|&x| x == max) {
            return i as u32;
        }
    }
    // Every value is -inf or NaN.
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).unwrap()
    }

    #[test]
    fn argmax_is_the_first_largest_and_skips_nan() {
        // The one-pass definition the vectorised version must equal.
        fn reference(xs: &[f32]) -> u32 {
            let mut best = 0;
            for (i, &x) in xs.iter().enumerate() {
                if x > xs[best] || xs[best].is_nan() {
                    best = i;
                }
            }
            best as u32
        }
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as u32
        };
        for len in [1, 2, 15, 16, 17, 33, 1000, 49152] {
            for _ in 0..20 {
                let xs: Vec<f32> = (0..len)
                    .map(|_| match next() % 50 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        // Few distinct values, so the maximum repeats.
                        v => (v % 7) as f32 - 3.0,
                    })
                    .collect();
                assert_eq!(argmax(&xs), reference(&xs), "{xs:?}");
            }
        }
        for special in [
            vec![f32::NAN, f32::NAN],
            vec![f32::NEG_INFINITY; 20],
            vec![f32::NAN, f32::NEG_INFINITY, f32::NAN],
            vec![f32::INFINITY, 1.0, f32::INFINITY],
        ] {
            assert_eq!(argmax(&special), reference(&special), "{special:?}");
        }
    }

    #[test]
    fn greedy_and_penalty() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 2.0, 2.0, -1.0], &[]), 1);
        let mut s = sampler(SamplingParams {
            repetition_penalty: 4.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.0, -1.0], &[1, 1]), 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            seed: Some(7),
            ..Default::default()
        };
        let logits = [1.0f32, 1.1, 0.9, 1.05, -3.0];
        let draw = |p: &SamplingParams| {
            let mut s = sampler(p.clone());
            (0..200)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(a.iter().all(|&id| id == 1 || id == 3));
        assert!(a.contains(&1) && a.contains(&3));
    }

    #[test]
    fn a_vanishing_temperature_tends_to_greedy() {
        // 1e-300 is 0 as an f32: dividing the logits by it gave inf - inf = NaN, and
        // then the least likely token.
        for temperature in [1e-300, f64::MIN_POSITIVE, 1e-30] {
            let mut s = sampler(SamplingParams {
                temperature,
                seed: Some(3),
                ..Default::default()
            });
            for _ in 0..20 {
                assert_eq!(
                    s.sample(&mut [0.5, 2.0, -1.0, 1.9], &[]),
                    1,
                    "T = {temperature}"
                );
            }
        }
    }

    #[test]
    fn top_p_keeps_the_head() {
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            top_p: Some(0.5),
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 5.0, 0.0], &[]), 1);
        }
    }

    #[test]
    fn invalid_params() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_k: Some(0),
                ..Default::default()
            },
            SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
        ] {
            assert!(matches!(p.validate(), Err(Error::InvalidArgument { .. })));
        }
    }
}
