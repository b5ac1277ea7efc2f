//! The attention backends against a brute-force, scalar, f64 evaluation of the
//! SelfExtend formula written out here independently of the crate.

mod common;

use candle_core::{Device, Tensor};
use common::{max_rel_diff, Rng};
use selfextend_core::attention::{run_attention, run_attention_ragged, Positions, Ragged};
use selfextend_core::rope::RotaryEmbedding;
use selfextend_core::{AttentionBackend, AttentionParams, SelfExtend};

const THETA: f64 = 10_000.0;

/// What a layer may add to plain attention: a sliding window, soft-capped scores, a
/// scale other than `1 / sqrt(d)`, and partial rotary (only `rotary_dim` rotate).
#[derive(Debug, Clone, Copy)]
struct Layer {
    window: Option<usize>,
    softcap: Option<f64>,
    scale: Option<f64>,
    rotary_dim: Option<usize>,
}

const PLAIN: Layer = Layer {
    window: None,
    softcap: None,
    scale: None,
    rotary_dim: None,
};

/// Rotates the first `rot` dimensions of one head vector to position `pos` ("rotate
/// half" layout within them); the rest pass through.
fn rope(x: &[f32], pos: usize, rot: usize) -> Vec<f64> {
    let half = rot / 2;
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for i in 0..half {
        let angle = pos as f64 / THETA.powf(2.0 * i as f64 / rot as f64);
        let (s, c) = angle.sin_cos();
        let (a, b) = (x[i] as f64, x[i + half] as f64);
        out[i] = a * c - b * s;
        out[i + half] = b * c + a * s;
    }
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `q: [b][h][s][d]`, `k`, `v: [b][kvh][n][d]` flattened; queries sit at `n - s ..`.
#[allow(clippy::too_many_arguments)]
fn brute_force(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, h, s, d): (usize, usize, usize, usize),
    (kvh, n): (usize, usize),
    se: Option<(usize, usize)>,
    layer: Layer,
) -> Vec<f32> {
    let mut out = vec![0f32; b * h * s * d];
    let scale = layer.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let rot = layer.rotary_dim.unwrap_or(d);
    let first = |i: usize| layer.window.map_or(0, |w| (i + 1).saturating_sub(w));
    for bi in 0..b {
        for hi in 0..h {
            let kv = hi / (h / kvh);
            for t in 0..s {
                let i = n - s + t;
                let qv = &q[((bi * h + hi) * s + t) * d..][..d];
                let keys = first(i)..=i;
                let scores: Vec<f64> = keys
                    .clone()
                    .map(|j| {
                        let kvec = &k[((bi * kvh + kv) * n + j) * d..][..d];
                        let (qp, kp) = match se {
                            Some((g, w)) if i - j >= w => (i / g + w - w / g, j / g),
                            _ => (i, j),
                        };
                        let score = dot(&rope(qv, qp, rot), &rope(kvec, kp, rot)) * scale;
                        match layer.softcap {
                            Some(cap) => cap * (score / cap).tanh(),
                            None => score,
                        }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = exps.iter().sum();
                for e in 0..d {
                    let acc: f64 = keys
                        .clone()
                        .zip(&exps)
                        .map(|(j, p)| p / z * v[((bi * kvh + kv) * n + j) * d + e] as f64)
                        .sum();
                    out[((bi * h + hi) * s + t) * d + e] = acc as f32;
                }
            }
        }
    }
    out
}

fn check(
    rng: &mut Rng,
    shape: (usize, usize, usize, usize),
    kv: (usize, usize),
    se: Option<(usize, usize)>,
) {
    check_layer(rng, shape, kv, se, PLAIN)
}

fn check_layer(
    rng: &mut Rng,
    shape: (usize, usize, usize, usize),
    kv: (usize, usize),
    se: Option<(usize, usize)>,
    layer: Layer,
) {
    let (b, h, s, d) = shape;
    let (kvh, n) = kv;
    let dev = Device::Cpu;
    // Large magnitudes make the softmax peaked, so a wrong position shows.
    let q = rng.vec(b * h * s * d, 2.0);
    let k = rng.vec(b * kvh * n * d, 2.0);
    let v = rng.vec(b * kvh * n * d, 1.0);
    let expected = brute_force(&q, &k, &v, shape, kv, se, layer);
    let qt = Tensor::from_vec(q, (b, h, s, d), &dev).unwrap();
    let kt = Tensor::from_vec(k, (b, kvh, n, d), &dev).unwrap();
    let vt = Tensor::from_vec(v, (b, kvh, n, d), &dev).unwrap();
    let self_extend = se.map(|(g, w)| SelfExtend::new(g, w).unwrap());
    let rope = RotaryEmbedding::with_params(layer.rotary_dim.unwrap_or(d), THETA, None);
    // Blocks of 1 and 3 query rows split the chunk across the window boundary.
    for backend in [
        AttentionBackend::Naive,
        AttentionBackend::Fused,
        AttentionBackend::TILED,
        AttentionBackend::Tiled { query_block: 3 },
        AttentionBackend::Tiled { query_block: 1 },
    ] {
        let defaults = AttentionParams::new(d, self_extend);
        let params = AttentionParams {
            backend,
            sliding_window: layer.window,
            softcap: layer.softcap,
            scale: layer.scale.unwrap_or(defaults.scale),
            ..defaults
        };
        let got = run_attention(&qt, &kt, &vt, &Positions::new(&rope, s, n), &params).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = max_rel_diff(&got, &expected);
        assert!(
            err < 1e-5,
            "{backend:?} shape {shape:?} kv {kv:?} se {se:?} {layer:?}: max relative error {err}"
        );
    }
}

#[test]
fn matches_brute_force_across_shapes_and_settings() {
    let mut rng = Rng::new(1);
    let settings = [
        None,
        Some((1, 1)),
        Some((2, 4)),
        Some((3, 5)),
        Some((4, 6)),
        Some((5, 3)),
        Some((7, 2)),
        Some((2, 1000)),
    ];
    let heads = [(4, 4), (4, 2), (6, 2), (3, 1)];
    for (case, se) in settings.iter().enumerate() {
        for &(h, kvh) in &heads {
            for d in [4, 8] {
                let n = 17 + 5 * case;
                // Full prefill, a chunk in the middle of the sequence, and one decode step.
                for s in [n, 7, 1] {
                    check(&mut rng, (1, h, s, d), (kvh, n), *se);
                }
            }
        }
    }
}

#[test]
fn tiles_larger_than_one_block() {
    // Several query and key tiles, with the window boundary crossing some of them.
    let mut rng = Rng::new(4);
    for (se, n, s) in [
        (Some((4, 100)), 300, 300),
        (Some((3, 37)), 290, 161),
        (None, 260, 260),
        (Some((2, 200)), 400, 1),
    ] {
        check(&mut rng, (1, 6, s, 8), (2, n), se);
    }
}

#[test]
fn every_fused_kernel_path() {
    // Head dims with and without a 32-lane remainder; row-major keys (few rows) and
    // transposed keys (many rows); decode with the key range split across items; a
    // window of 1, where almost every pair is grouped.
    let mut rng = Rng::new(5);
    let cases = [
        ((1, 6, 1, 64), (2, 1100), Some((4, 300))),
        ((1, 6, 1, 64), (2, 1100), None),
        ((1, 4, 3, 40), (1, 700), Some((3, 50))),
        ((2, 8, 70, 64), (2, 600), Some((5, 128))),
        ((1, 2, 40, 96), (1, 40), None),
        ((1, 4, 64, 64), (4, 64), Some((2, 1))),
        ((1, 3, 1, 32), (3, 900), Some((8, 1))),
        // Row counts that leave 1, 2 and 3 rows after the blocks of four.
        ((1, 3, 23, 40), (1, 300), Some((3, 20))),
        ((1, 6, 45, 64), (2, 200), Some((4, 30))),
        ((1, 2, 41, 48), (2, 130), None),
    ];
    for (shape, kv, se) in cases {
        check(&mut rng, shape, kv, se);
    }
}

#[test]
fn sliding_windows_soft_caps_and_partial_rotary() {
    // Windows shorter than, across and longer than the chunk and the SelfExtend window,
    // in prefill, chunks and decode, on every backend (the fused kernel with row-major
    // and transposed keys, and split key ranges for decode).
    let mut rng = Rng::new(6);
    for window in [1, 3, 8, 37, 500] {
        for se in [None, Some((3, 5)), Some((2, 20))] {
            let layer = Layer {
                window: Some(window),
                ..PLAIN
            };
            for s in [60, 9, 1] {
                check_layer(&mut rng, (1, 4, s, 8), (2, 60), se, layer);
            }
        }
    }
    check_layer(
        &mut rng,
        (1, 6, 1, 64),
        (2, 1100),
        Some((4, 300)),
        Layer {
            window: Some(700),
            ..PLAIN
        },
    );
    check_layer(
        &mut rng,
        (1, 6, 70, 64),
        (2, 600),
        None,
        Layer {
            window: Some(130),
            ..PLAIN
        },
    );
    let capped = Layer {
        softcap: Some(1.5),
        scale: Some(0.2),
        rotary_dim: Some(4),
        window: Some(11),
    };
    for se in [None, Some((3, 5))] {
        for s in [40, 6, 1] {
            check_layer(&mut rng, (1, 4, s, 8), (2, 40), se, capped);
            check_layer(
                &mut rng,
                (1, 4, s, 8),
                (2, 40),
                se,
                Layer {
                    window: None,
                    ..capped
                },
            );
        }
    }
}

#[test]
fn ragged_batches_match_each_sequence_alone() {
    // A decode step's mix (single rows over short and long caches, the long ones split
    // across items) with prefill chunks, each sequence with its own SelfExtend setting
    // and sliding window; a batch of small calls that runs on one thread; one prefill
    // chunk; one decode row whose keys are split, alone and with others.
    let mut rng = Rng::new(8);
    let (h, kvh, d) = (6, 2, 32);
    type Case = (usize, usize, Option<(usize, usize)>, Option<usize>);
    let batches: [&[Case]; 5] = [
        &[
            (1, 900, Some((4, 100)), None),
            (1, 7, None, None),
            (37, 120, Some((3, 16)), None),
            (1, 300, None, Some(50)),
            (5, 5, Some((2, 2)), Some(3)),
            (1, 1200, None, None),
        ],
        &[
            (1, 3, None, None),
            (1, 9, Some((2, 4)), None),
            (2, 2, None, None),
        ],
        &[(64, 70, Some((4, 8)), None)],
        &[(1, 1100, Some((4, 300)), None)],
        &[
            (1, 1100, Some((4, 300)), None),
            (1, 700, None, None),
            (1, 900, None, Some(500)),
        ],
    ];
    for (i, batch) in batches.iter().enumerate() {
        let rope = RotaryEmbedding::with_params(d, THETA, None);
        let mut expected = Vec::new();
        let mut operands = Vec::new();
        for &(s, n, se, window) in batch.iter() {
            let q = rng.vec(h * s * d, 2.0);
            let k = rng.vec(kvh * n * d, 2.0);
            let v = rng.vec(kvh * n * d, 1.0);
            let layer = Layer { window, ..PLAIN };
            let alone = brute_force(&q, &k, &v, (1, h, s, d), (kvh, n), se, layer);
            // The ragged output is (rows, heads * d): row t holds every head's values.
            for t in 0..s {
                for hi in 0..h {
                    expected.extend_from_slice(&alone[(hi * s + t) * d..][..d]);
                }
            }
            let dev = Device::Cpu;
            // Queries as the decoder passes them: a transposed, strided view.
            let q = Tensor::from_vec(q, (1, h, s, d), &dev).unwrap();
            let q = q
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let k = Tensor::from_vec(k, (1, kvh, n, d), &dev).unwrap();
            let v = Tensor::from_vec(v, (1, kvh, n, d), &dev).unwrap();
            operands.push((q, k, v, se, window, Positions::new(&rope, s, n)));
        }
        for backend in [
            AttentionBackend::Fused,
            AttentionBackend::Naive,
            AttentionBackend::TILED,
        ] {
            let params: Vec<AttentionParams> = operands
                .iter()
                .map(|(_, _, _, se, window, _)| AttentionParams {
                    backend,
                    sliding_window: *window,
                    ..AttentionParams::new(d, se.map(|(g, w)| SelfExtend::new(g, w).unwrap()))
                })
                .collect();
            let calls: Vec<Ragged> = operands
                .iter()
                .zip(&params)
                .map(|((q, k, v, _, _, positions), params)| Ragged {
                    q: q.clone(),
                    k: k.clone(),
                    v: v.clone(),
                    positions,
                    params,
                })
                .collect();
            let got = run_attention_ragged(&calls).unwrap();
            let rows: usize = batch.iter().map(|c| c.0).sum();
            assert_eq!(got.dims(), &[1, rows, h * d]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = max_rel_diff(&got, &expected);
            assert!(
                err < 1e-5,
                "batch {i}, {backend:?}: max relative error {err}"
            );
            // Exactly what each sequence gets alone: batching must not change a result.
            let alone: Vec<f32> = calls
                .iter()
                .flat_map(|c| {
                    let ys = run_attention(&c.q, &c.k, &c.v, c.positions, c.params).unwrap();
                    let q_len = ys.dim(2).unwrap();
                    let ys = ys.transpose(1, 2).unwrap().reshape((q_len, h * d)).unwrap();
                    ys.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect();
            assert!(
                got == alone,
                "batch {i}, {backend:?}: differs from each sequence alone"
            );
        }
    }
}

#[test]
fn f16_keys_and_values_are_read_as_stored() {
    // An f16 KV cache: every backend computes the formula on the stored (rounded)
    // keys and values, as tightly as on f32 ones. Decode with split keys, a prefill
    // chunk, a sliding window.
    let mut rng = Rng::new(9);
    let cases = [
        ((1, 6, 1, 64), (2, 1100), Some((4, 300)), None),
        ((1, 4, 37, 40), (2, 120), Some((3, 16)), None),
        ((1, 4, 5, 8), (2, 60), None, Some(9)),
    ];
    for (shape, kv, se, window) in cases {
        let (b, h, s, d) = shape;
        let (kvh, n) = kv;
        let dev = Device::Cpu;
        let q = rng.vec(b * h * s * d, 2.0);
        let stored = |x: Vec<f32>| -> Vec<f32> {
            x.into_iter()
                .map(|x| half::f16::from_f32(x).to_f32())
                .collect()
        };
        let k = stored(rng.vec(b * kvh * n * d, 2.0));
        let v = stored(rng.vec(b * kvh * n * d, 1.0));
        let layer = Layer { window, ..PLAIN };
        let expected = brute_force(&q, &k, &v, shape, kv, se, layer);
        let qt = Tensor::from_vec(q, (b, h, s, d), &dev).unwrap();
        let half = |x: Vec<f32>| {
            Tensor::from_vec(x, (b, kvh, n, d), &dev)
                .unwrap()
                .to_dtype(candle_core::DType::F16)
                .unwrap()
        };
        let (kt, vt) = (half(k), half(v));
        let rope = RotaryEmbedding::with_params(d, THETA, None);
        for backend in [
            AttentionBackend::Fused,
            AttentionBackend::Naive,
            AttentionBackend::TILED,
        ] {
            let params = AttentionParams {
                backend,
                sliding_window: window,
                ..AttentionParams::new(d, se.map(|(g, w)| SelfExtend::new(g, w).unwrap()))
            };
            let got = run_attention(&qt, &kt, &vt, &Positions::new(&rope, s, n), &params).unwrap();
            assert_eq!(got.dtype(), candle_core::DType::F32);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = max_rel_diff(&got, &expected);
            assert!(
                err < 1e-5,
                "{backend:?} {shape:?} {kv:?} {se:?}: max relative error {err}"
            );
        }
    }
}

#[test]
fn strided_keys_and_values_read_as_contiguous_ones() {
    // Keys and values laid out `(batch, seq, kv_heads, head_dim)` and viewed transposed:
    // rows of one head are not adjacent, so the fused kernel gathers them row by row
    // (f32 and f16) instead of reading a tile in one slice. Same values, same result.
    let mut rng = Rng::new(13);
    let (b, h, kvh, d) = (1, 6, 2, 64);
    let dev = Device::Cpu;
    for (s, n) in [(1, 700), (40, 200)] {
        let q = Tensor::from_vec(rng.vec(b * h * s * d, 2.0), (b, h, s, d), &dev).unwrap();
        let seq_major = |x: Vec<f32>| Tensor::from_vec(x, (b, n, kvh, d), &dev).unwrap();
        let (k, v) = (
            seq_major(rng.vec(b * n * kvh * d, 2.0)),
            seq_major(rng.vec(b * n * kvh * d, 1.0)),
        );
        let rope = RotaryEmbedding::with_params(d, THETA, None);
        let positions = Positions::new(&rope, s, n);
        let params = AttentionParams::new(d, Some(SelfExtend::new(4, 64).unwrap()));
        for dtype in [candle_core::DType::F32, candle_core::DType::F16] {
            let strided = |x: &Tensor| x.to_dtype(dtype).unwrap().transpose(1, 2).unwrap();
            let (ks, vs) = (strided(&k), strided(&v));
            assert!(!ks.is_contiguous());
            let (kc, vc) = (ks.contiguous().unwrap(), vs.contiguous().unwrap());
            let got = run_attention(&q, &ks, &vs, &positions, &params).unwrap();
            let want = run_attention(&q, &kc, &vc, &positions, &params).unwrap();
            let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(
                flat(got),
                flat(want),
                "{dtype:?}, {s} queries over {n} keys"
            );
        }
    }
}

#[test]
fn ragged_batches_refuse_mismatched_sequences() {
    let dev = Device::Cpu;
    let rope = RotaryEmbedding::with_params(8, THETA, None);
    let params = AttentionParams::new(8, None);
    let positions = Positions::new(&rope, 1, 4);
    let call = |heads: usize| Ragged {
        q: Tensor::zeros((1, heads, 1, 8), candle_core::DType::F32, &dev).unwrap(),
        k: Tensor::zeros((1, 2, 4, 8), candle_core::DType::F32, &dev).unwrap(),
        v: Tensor::zeros((1, 2, 4, 8), candle_core::DType::F32, &dev).unwrap(),
        positions: &positions,
        params: &params,
    };
    assert!(run_attention_ragged(&[]).is_err());
    let err = run_attention_ragged(&[call(4), call(2)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("shared head count"), "{err}");
    assert!(run_attention_ragged(&[call(4), call(4)]).is_ok());
}

#[test]
fn batch_and_chunk_boundaries_at_the_window() {
    let mut rng = Rng::new(2);
    // Chunks ending just before, at and just after the first grouped pair (n == W + 1).
    for (g, w) in [(2, 6), (3, 7), (4, 4)] {
        for n in [w - 1, w, w + 1, w + 2, 3 * w] {
            for s in [1, 2, n.min(5), n] {
                check(&mut rng, (2, 4, s, 8), (2, n), Some((g, w)));
            }
        }
    }
}

#[test]
fn window_covering_the_sequence_is_vanilla() {
    let mut rng = Rng::new(3);
    let (h, n, d) = (4, 40, 8);
    let q = Tensor::from_vec(rng.vec(h * n * d, 2.0), (1, h, n, d), &Device::Cpu).unwrap();
    let k = Tensor::from_vec(rng.vec(h * n * d, 2.0), (1, h, n, d), &Device::Cpu).unwrap();
    let v = Tensor::from_vec(rng.vec(h * n * d, 1.0), (1, h, n, d), &Device::Cpu).unwrap();
    let rope = RotaryEmbedding::with_params(d, THETA, None);
    let run = |se| {
        run_attention(
            &q,
            &k,
            &v,
            &Positions::new(&rope, n, n),
            &AttentionParams::new(d, se),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
    };
    let vanilla = run(None);
    assert_eq!(run(Some(SelfExtend::new(4, n).unwrap())), vanilla);
    let grouped = run(Some(SelfExtend::new(4, 8).unwrap()));
    assert!(
        max_rel_diff(&grouped, &vanilla) > 1e-2,
        "SelfExtend had no effect"
    );
}

#[test]
fn self_extend_parameters() {
    assert!(SelfExtend::new(0, 4).is_err());
    assert!(SelfExtend::new(4, 0).is_err());
    let se = SelfExtend::new(4, 1024).unwrap();
    assert_eq!(se.max_context(8192), (8192 - 1024) * 4 + 1024);
    assert_eq!(SelfExtend::new(4, 9000).unwrap().max_context(8192), 8192);
    assert_eq!(se.grouped_query_position(5000), 5000 / 4 + 1024 - 256);
}

#[test]
fn auto_obeys_its_rules() {
    for trained in [32, 100, 256, 2048, 4096, 8192, 32768] {
        for target in [
            1,
            trained / 2,
            trained,
            2 * trained,
            3 * trained + 7,
            4 * trained,
            16 * trained,
        ] {
            let target = target.max(1);
            let se = SelfExtend::auto(target, trained).unwrap();
            let (g, w) = (se.group_size(), se.window());
            assert!(
                se.max_context(trained) >= target,
                "{target} {trained} {se:?}"
            );
            assert!(
                (target - 1) / g + w - w / g <= 2 * trained / 3,
                "{target} {trained} {se:?}"
            );
            if g > 1 {
                // Minimal: one group fewer would break the 2L/3 rule.
                let g1 = g - 1;
                assert!((target - 1) / g1 + w - w / g1 > 2 * trained / 3);
            }
            if trained >= 256 {
                assert_eq!(w % 64, 0);
                assert!(w * 8 >= trained && w * 8 <= 3 * trained);
            }
        }
    }
    assert_eq!(SelfExtend::auto(4000, 8192).unwrap().group_size(), 1);
    assert!(SelfExtend::auto(0, 8192).is_err());
}

#[test]
fn auto_picks_the_smallest_group_that_fits_at_any_target() {
    let fits = |target: usize, trained: usize, g: usize, w: usize| {
        (target - 1) / g + w - w / g <= 2 * trained / 3
    };
    // Against a scan from g = 1 (the grouped position is not monotone in g).
    for trained in (4..80).chain([255, 256, 300, 1000, 8192]) {
        for target in (1..120 * trained).step_by(1 + trained / 7) {
            let se = SelfExtend::auto(target, trained).unwrap();
            let w = se.window();
            let smallest = (1..).find(|&g| fits(target, trained, g, w)).unwrap();
            assert_eq!(
                se.group_size(),
                smallest,
                "target {target}, trained {trained}"
            );
        }
    }
    // Targets no scan from 1 could reach return at once, and still obey the rule.
    for trained in [4, 5, 8192, 131072] {
        for target in [1 << 40, 1 << 62, usize::MAX] {
            let se = SelfExtend::auto(target, trained).unwrap();
            let (g, w) = (se.group_size(), se.window());
            assert!(fits(target, trained, g, w), "{target} {trained} {se:?}");
            assert!(
                g > w && !fits(target, trained, g - 1, w),
                "{target} {trained} {se:?}"
            );
        }
    }
}
