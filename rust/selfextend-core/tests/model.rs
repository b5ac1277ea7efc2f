//! Whole-model equivalences on tiny random Llamas: full prefill, chunked prefill and
//! token-by-token decode produce the same logits, with and without SelfExtend.

mod common;

use std::sync::Arc;

use candle_core::DType;
use common::{max_rel_diff, tiny_config, tiny_mixed_config, tiny_model, tiny_quantized_model, Rng};
use selfextend_core::generate::{generate, FinishReason, GenerateOptions, Generation};
use selfextend_core::kv_cache::KvCache;
use selfextend_core::model::LogitsFor;
use selfextend_core::{AttentionBackend, Config, Error, Model, RopeScaling, SelfExtend};

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| 2 + rng.below(vocab - 2) as u32).collect()
}

fn no_progress() -> impl FnMut(usize, usize) -> selfextend_core::Result<()> {
    |_, _| Ok(())
}

#[test]
fn prefill_chunks_and_decode_agree() {
    for (kv_heads, tie) in [(2, false), (4, true), (1, false)] {
        let cfg = tiny_config(kv_heads, tie);
        check_chunks_and_decode(&tiny_model(&cfg, 7), &cfg, &format!("kv {kv_heads}"));
    }
}

#[test]
fn mixed_layers_agree_across_chunks_decode_and_backends() {
    let cfg = tiny_mixed_config();
    let mut model = tiny_model(&cfg, 9);
    check_chunks_and_decode(&model, &cfg, "mixed");
    let tokens = ids(70, cfg.vocab_size, 12);
    let logits = |model: &Model, se| {
        let params = model.attention_params(se);
        model
            .logits(&tokens, &params, Some(16), &mut no_progress())
            .unwrap()
    };
    for se in [None, Some(SelfExtend::new(3, 6).unwrap())] {
        let fused = logits(&model, se);
        for backend in [AttentionBackend::Naive, AttentionBackend::TILED] {
            model.set_attention_backend(Some(backend));
            let err = max_rel_diff(&logits(&model, se), &fused);
            assert!(err < 1e-5, "{backend:?} se {se:?}: {err}");
        }
        model.set_attention_backend(None);
    }
}

#[test]
fn a_window_past_the_sequence_is_plain_attention_and_costs_nothing() {
    let cfg = tiny_config(2, false);
    let mut model = tiny_model(&cfg, 3);
    let tokens = ids(40, cfg.vocab_size, 8);
    // The fused kernel once sized its rotary table by the grouped positions a window
    // this wide would give (about 2^40 rows), although no pair is grouped, and the
    // allocation aborted the process.
    let huge = Some(SelfExtend::new(2, 1 << 40).unwrap());
    for backend in [
        None,
        Some(AttentionBackend::Naive),
        Some(AttentionBackend::TILED),
    ] {
        model.set_attention_backend(backend);
        let logits = |se| {
            let params = model.attention_params(se);
            model
                .logits(&tokens, &params, Some(16), &mut no_progress())
                .unwrap()
        };
        assert_eq!(logits(huge), logits(None), "{backend:?}");
    }
}

#[test]
fn a_generation_reserves_its_prompt_and_a_bounded_lead() {
    let cfg = tiny_config(2, false);
    let model = Arc::new(tiny_model(&cfg, 3));
    let opts = GenerateOptions {
        max_new_tokens: 1 << 20,
        ..Default::default()
    };
    let mut generation = Generation::new(model.clone(), ids(10, cfg.vocab_size, 4), opts).unwrap();
    generation.prefill(&mut no_progress()).unwrap();
    let per_position = KvCache::bytes_for(
        1,
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.head_dim,
        model.kv_cache_dtype(),
    );
    let bytes = generation.cache_mut().allocated_bytes();
    // Not the 2^20 positions the request could reach.
    assert!(
        bytes > 0 && bytes <= (10 + 8192) * per_position,
        "{bytes} bytes, {per_position} per position"
    );
}

#[test]
fn self_extend_applies_to_global_layers_only() {
    let mut cfg = tiny_mixed_config();
    let model = tiny_model(&cfg, 9);
    let call = model.attention_params(Some(SelfExtend::new(3, 6).unwrap()));
    let decoder = model.decoder();
    let (global, local) = (
        decoder.layer_params(0, &call),
        decoder.layer_params(1, &call),
    );
    assert!(global.self_extend.is_some() && global.sliding_window.is_none());
    assert!(local.self_extend.is_none() && local.sliding_window == Some(5));
    assert_eq!(cfg.extended_layers(), [0, 2]);
    // A declared window longer than the trained context does not protect the layer.
    cfg.attention_kinds[1].sliding_window = Some(cfg.max_position_embeddings + 1);
    assert_eq!(cfg.extended_layers(), [0, 1, 2]);
    let model = tiny_model(&cfg, 9);
    let local = model.decoder().layer_params(1, &call);
    assert!(local.self_extend.is_some() && local.sliding_window.is_some());
}

/// Full prefill, prefill in chunks of several sizes, and prefill then token-by-token
/// decode give the same logits, with and without SelfExtend.
fn check_chunks_and_decode(model: &Model, cfg: &Config, what: &str) {
    check_chunks_and_decode_within(model, cfg, what, 1e-5)
}

fn check_chunks_and_decode_within(model: &Model, cfg: &Config, what: &str, tolerance: f32) {
    {
        let tokens = ids(70, cfg.vocab_size, 11);
        for se in [None, Some((2, 4)), Some((3, 5)), Some((4, 16))] {
            let se = se.map(|(g, w)| SelfExtend::new(g, w).unwrap());
            let full = model
                .logits(
                    &tokens,
                    &model.attention_params(se),
                    Some(tokens.len()),
                    &mut no_progress(),
                )
                .unwrap();
            for chunk in [1, 3, 16, 33] {
                let chunked = model
                    .logits(
                        &tokens,
                        &model.attention_params(se),
                        Some(chunk),
                        &mut no_progress(),
                    )
                    .unwrap();
                let err = max_rel_diff(&chunked, &full);
                assert!(err < tolerance, "{what} se {se:?} chunk {chunk}: {err}");
            }
            // Decode: prefill 10 tokens, then feed one at a time through the cache.
            let params = model.attention_params(se);
            let mut cache = model.new_cache(4);
            let mut decoded = model
                .forward_chunked(
                    &tokens[..10],
                    &mut cache,
                    &params,
                    4,
                    LogitsFor::All,
                    &mut no_progress(),
                )
                .unwrap();
            for &t in &tokens[10..] {
                decoded.extend(
                    model
                        .forward_chunked(
                            &[t],
                            &mut cache,
                            &params,
                            1,
                            LogitsFor::Last,
                            &mut no_progress(),
                        )
                        .unwrap(),
                );
            }
            let err = max_rel_diff(&decoded, &full);
            assert!(err < tolerance, "{what} se {se:?} decode: {err}");
        }
    }
}

#[test]
fn an_f16_cache_is_consistent_and_close_to_the_f32_one() {
    let cfg = tiny_config(2, false);
    let mut model = tiny_model(&cfg, 7);
    assert_eq!(model.kv_cache_dtype(), DType::F32);
    let blocks = Config {
        intermediate_size: 64,
        ..cfg.clone()
    };
    assert_eq!(
        tiny_quantized_model(&blocks, 7).kv_cache_dtype(),
        DType::F16
    );
    let tokens = ids(70, cfg.vocab_size, 11);
    let logits = |model: &Model, se| {
        let params = model.attention_params(se);
        model
            .logits(&tokens, &params, Some(16), &mut no_progress())
            .unwrap()
    };
    let mut exact = vec![];
    for se in [None, Some(SelfExtend::new(3, 5).unwrap())] {
        exact.push(logits(&model, se));
    }
    model.set_kv_cache_dtype(Some(DType::F16));
    assert_eq!(model.kv_cache_dtype(), DType::F16);
    // Chunks and decode store the same keys up to one f16 rounding, which a 1e-7
    // difference upstream (another summation order) can flip.
    check_chunks_and_decode_within(&model, &cfg, "f16 cache", 1e-3);
    for (se, exact) in [None, Some(SelfExtend::new(3, 5).unwrap())]
        .into_iter()
        .zip(exact)
    {
        let half = logits(&model, se);
        let err = max_rel_diff(&half, &exact);
        // Keys and values rounded to f16 (relative 2^-11): close, and not the same.
        assert!(err > 0.0 && err < 5e-3, "se {se:?}: {err}");
    }
    let cache_bytes = |model: &Model| {
        let mut cache = model.new_cache(8);
        let params = model.attention_params(None);
        model
            .forward_chunked(
                &tokens[..8],
                &mut cache,
                &params,
                8,
                LogitsFor::Last,
                &mut no_progress(),
            )
            .unwrap();
        cache.allocated_bytes()
    };
    let f16_bytes = cache_bytes(&model);
    model.set_kv_cache_dtype(None);
    assert_eq!(2 * f16_bytes, cache_bytes(&model));
}

#[test]
fn self_extend_changes_logits_only_past_the_window() {
    let cfg = tiny_config(2, false);
    let model = tiny_model(&cfg, 3);
    let vocab = cfg.vocab_size;
    let tokens = ids(64, vocab, 5);
    let logits = |se: Option<SelfExtend>| {
        model
            .logits(
                &tokens,
                &model.attention_params(se),
                None,
                &mut no_progress(),
            )
            .unwrap()
    };
    let vanilla = logits(None);
    assert_eq!(logits(Some(SelfExtend::new(4, 64).unwrap())), vanilla);
    let (g, w) = (4, 8);
    let se = logits(Some(SelfExtend::new(g, w).unwrap()));
    // Positions below W see only neighbors: identical. Later ones must differ.
    assert_eq!(se[..w * vocab], vanilla[..w * vocab]);
    assert!(max_rel_diff(&se[w * vocab..], &vanilla[w * vocab..]) > 1e-2);
}

#[test]
fn generate_is_greedy_argmax_chain_and_validates() {
    let cfg = tiny_config(2, false);
    let model = Arc::new(tiny_model(&cfg, 9));
    let prompt = ids(20, cfg.vocab_size, 1);
    let se = Some(SelfExtend::new(2, 6).unwrap());
    let out = generate(
        &model,
        prompt.clone(),
        GenerateOptions {
            max_new_tokens: 12,
            self_extend: se,
            chunk_size: Some(7),
            ..Default::default()
        },
        &mut no_progress(),
    )
    .unwrap();
    // Recompute each step from scratch: the argmax of the last row of full logits.
    let mut seq = prompt.clone();
    for &id in &out.token_ids {
        let logits = model
            .logits(&seq, &model.attention_params(se), None, &mut no_progress())
            .unwrap();
        let last = &logits[(seq.len() - 1) * cfg.vocab_size..];
        assert_eq!(id, selfextend_core::sampling::argmax(last));
        seq.push(id);
    }
    match out.finish_reason {
        FinishReason::Length => assert_eq!(out.token_ids.len(), 12),
        FinishReason::Eos => assert!(out.token_ids.len() < 12),
        FinishReason::Stop => panic!("no stop strings were given"),
    }

    let bad = |opts: GenerateOptions, prompt: Vec<u32>| {
        generate(&model, prompt, opts, &mut no_progress()).unwrap_err()
    };
    assert!(matches!(
        bad(Default::default(), vec![]),
        Error::InvalidArgument { name: "prompt", .. }
    ));
    assert!(matches!(
        bad(Default::default(), vec![cfg.vocab_size as u32]),
        Error::InvalidArgument {
            name: "token_ids",
            ..
        }
    ));
    assert!(matches!(
        bad(
            GenerateOptions {
                chunk_size: Some(0),
                ..Default::default()
            },
            prompt.clone()
        ),
        Error::InvalidArgument {
            name: "chunk_size",
            ..
        }
    ));
    assert!(matches!(
        bad(
            GenerateOptions {
                max_new_tokens: usize::MAX / 2,
                ..Default::default()
            },
            prompt
        ),
        Error::OutOfMemory { .. }
    ));
}

#[test]
fn rope_scaling_overrides_match_a_model_configured_with_them() {
    let mut cfg = tiny_config(2, false);
    let tokens = ids(40, cfg.vocab_size, 4);
    let plain = tiny_model(&cfg, 5);
    let logits = |model: &selfextend_core::Model, scaling: Option<RopeScaling>, chunk: usize| {
        let params = model.attention_params_with(None, scaling);
        model
            .logits(&tokens, &params, Some(chunk), &mut no_progress())
            .unwrap()
    };
    let unscaled = logits(&plain, None, 40);
    let dynamic = RopeScaling::DynamicNtk {
        factor: 2.0,
        original_max_position_embeddings: cfg.max_position_embeddings,
    };
    for scaling in [
        RopeScaling::Linear { factor: 3.0 },
        RopeScaling::Ntk { factor: 3.0 },
        dynamic.clone(),
    ] {
        cfg.attention_kinds[0].rope.scaling = Some(scaling.clone());
        let configured = tiny_model(&cfg, 5);
        let expected = logits(&configured, None, 40);
        assert!(
            max_rel_diff(&expected, &unscaled) > 1e-3,
            "{scaling:?} changed nothing"
        );
        for chunk in [40, 7, 1] {
            let err = max_rel_diff(&logits(&plain, Some(scaling.clone()), chunk), &expected);
            assert!(err < 1e-5, "{scaling:?} chunk {chunk}: {err}");
        }
    }
    // Dynamic NTK within the trained context is plain RoPE.
    let short = &tokens[..cfg.max_position_embeddings];
    let params = plain.attention_params_with(None, Some(dynamic));
    assert_eq!(
        plain
            .logits(short, &params, None, &mut no_progress())
            .unwrap(),
        plain
            .logits(
                short,
                &plain.attention_params(None),
                None,
                &mut no_progress()
            )
            .unwrap()
    );
}

#[test]
fn token_logprobs_are_the_log_softmax_of_the_logits() {
    let cfg = tiny_config(2, true);
    let model = tiny_model(&cfg, 8);
    let tokens = ids(37, cfg.vocab_size, 2);
    let vocab = cfg.vocab_size;
    for se in [None, Some(SelfExtend::new(2, 5).unwrap())] {
        let params = model.attention_params(se);
        let logits = model
            .logits(&tokens, &params, None, &mut no_progress())
            .unwrap();
        for (from, chunk) in [(1, 37), (10, 4), (36, 5), (20, 1)] {
            let got = model
                .token_logprobs(&tokens, from, &params, Some(chunk), &mut no_progress())
                .unwrap();
            assert_eq!(got.len(), tokens.len() - from);
            for (k, t) in (from..tokens.len()).enumerate() {
                let row = &logits[(t - 1) * vocab..t * vocab];
                let max = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
                let lse = max
                    + row
                        .iter()
                        .map(|&x| (x as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                let want = row[tokens[t] as usize] as f64 - lse;
                assert!(
                    (got[k] as f64 - want).abs() < 1e-4,
                    "se {se:?} t {t}: {} vs {want}",
                    got[k]
                );
            }
        }
    }
    let params = model.attention_params(None);
    for from in [0, tokens.len()] {
        let err = model
            .token_logprobs(&tokens, from, &params, None, &mut no_progress())
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: "start", .. }),
            "{err}"
        );
    }
}

#[test]
fn a_batch_gives_each_sequence_its_own_logits() {
    use selfextend_core::model::SequenceStep;
    let models = [
        tiny_model(&tiny_config(2, false), 13),
        tiny_model(&tiny_mixed_config(), 13),
        // A quantized layer runs a 40-row prefill chunk on the dequantized weights and
        // decode rows on QMatMul, alone or batched together.
        tiny_quantized_model(
            &Config {
                intermediate_size: 64,
                ..tiny_config(2, false)
            },
            13,
        ),
    ];
    for model in &models {
        let cfg = model.config().clone();
        let decoder = model.decoder();
        let tokens = ids(60, cfg.vocab_size, 14);
        let se = |g, w| Some(SelfExtend::new(g, w).unwrap());
        let linear = model.attention_params_with(None, Some(RopeScaling::Linear { factor: 2.0 }));
        // (already cached, new tokens, settings, rows wanted): a 40-token prefill, a
        // decode step after 25, a chunk after 10 with some rows, a RoPE override.
        let cases = [
            (0, 40, model.attention_params(se(3, 5)), LogitsFor::All),
            (25, 1, model.attention_params(None), LogitsFor::Last),
            (10, 7, model.attention_params(se(2, 4)), LogitsFor::From(3)),
            (0, 5, linear, LogitsFor::All),
        ];
        let prefilled = |cached: usize, params| {
            let mut cache = decoder.new_cache(4);
            if cached > 0 {
                decoder
                    .forward(&tokens[..cached], &mut cache, params, LogitsFor::Last)
                    .unwrap();
            }
            cache
        };
        let mut alone = vec![];
        let mut alone_caches = vec![];
        for (cached, n, params, rows) in &cases {
            let mut cache = prefilled(*cached, params);
            let new = &tokens[*cached..cached + n];
            alone.push(decoder.forward(new, &mut cache, params, *rows).unwrap());
            alone_caches.push(cache);
        }
        let mut caches: Vec<_> = cases.iter().map(|(c, _, p, _)| prefilled(*c, p)).collect();
        let mut steps: Vec<SequenceStep> = cases
            .iter()
            .zip(caches.iter_mut())
            .map(|((cached, n, params, rows), cache)| SequenceStep {
                ids: &tokens[*cached..cached + n],
                cache,
                params,
                logits_for: *rows,
            })
            .collect();
        let batched = decoder.forward_batch(&mut steps, &mut || Ok(())).unwrap();
        let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
            assert_eq!(b.dims(), &a.dims()[1..], "sequence {i}");
            let err = max_rel_diff(&flat(b), &flat(a));
            assert!(err < 1e-5, "{} sequence {i}: {err}", cfg.model_type);
        }
        // The caches the batch filled continue exactly as the ones filled alone: one
        // more batched decode step for every sequence.
        let next: Vec<u32> = (0..cases.len() as u32).map(|i| 3 + i).collect();
        let mut steps: Vec<SequenceStep> = caches
            .iter_mut()
            .zip(&cases)
            .zip(&next)
            .map(|((cache, (_, _, params, _)), id)| SequenceStep {
                ids: std::slice::from_ref(id),
                cache,
                params,
                logits_for: LogitsFor::Last,
            })
            .collect();
        let batched = decoder.forward_batch(&mut steps, &mut || Ok(())).unwrap();
        for (i, ((cache, (_, _, params, _)), id)) in
            alone_caches.iter_mut().zip(&cases).zip(&next).enumerate()
        {
            let a = decoder
                .forward(&[*id], cache, params, LogitsFor::Last)
                .unwrap();
            let err = max_rel_diff(&flat(&batched[i]), &flat(&a));
            assert!(err < 1e-5, "{} decode {i}: {err}", cfg.model_type);
        }
    }
}

/// Every layout of a batch on the threads gives the same logits, and leaves caches that
/// continue alike: decode steps of 7 sequences with mixed settings, and a step that
/// mixes a prefill chunk with decode rows. To the bit on the packed quantized kernel,
/// which does each row's arithmetic alike whatever the rows around it; within batching's
/// own tolerance on dense weights, where candle's matmul may sum a row in another order
/// for another number of rows.
#[test]
fn batch_layouts_give_the_same_logits_to_the_bit() {
    use selfextend_core::model::{BatchLayout, SequenceStep};
    let models = [
        (
            tiny_quantized_model(
                &Config {
                    intermediate_size: 64,
                    ..tiny_config(2, false)
                },
                21,
            ),
            0.0,
        ),
        (tiny_model(&tiny_mixed_config(), 21), 1e-5),
    ];
    for (model, tolerance) in &models {
        let cfg = model.config().clone();
        let decoder = model.decoder();
        let tokens = ids(660, cfg.vocab_size, 22);
        let se = |g, w| Some(SelfExtend::new(g, w).unwrap());
        let linear = model.attention_params_with(None, Some(RopeScaling::Linear { factor: 2.0 }));
        let settings = [
            model.attention_params(None),
            model.attention_params(se(2, 4)),
            model.attention_params(se(4, 8)),
            linear,
        ];
        // (cached tokens, settings) per sequence; the caches are filled alone. The last
        // one is long enough for attention to split its keys across the pool's threads,
        // which a half running alone must cut alike.
        let mut seqs: Vec<(usize, &_)> = (0..7).map(|i| (5 + 7 * i, &settings[i % 4])).collect();
        seqs[6].0 = 600;
        let run = |layout: BatchLayout, chunk: usize| {
            let mut caches: Vec<_> = seqs
                .iter()
                .map(|&(cached, params)| {
                    let mut cache = decoder.new_cache(4);
                    decoder
                        .forward(&tokens[..cached], &mut cache, params, LogitsFor::Last)
                        .unwrap();
                    cache
                })
                .collect();
            let mut logits = vec![];
            // Two decode steps; with `chunk`, the second sequence's first step is a
            // prefill chunk of that many tokens.
            for step in 0..2 {
                let mut steps: Vec<SequenceStep> = caches
                    .iter_mut()
                    .zip(&seqs)
                    .enumerate()
                    .map(|(i, (cache, &(cached, params)))| {
                        let n = if i == 1 && step == 0 { chunk } else { 1 };
                        let at = cache.len();
                        debug_assert!(at >= cached);
                        SequenceStep {
                            ids: &tokens[at..at + n],
                            cache,
                            params,
                            logits_for: LogitsFor::All,
                        }
                    })
                    .collect();
                let out = decoder
                    .forward_batch_with(&mut steps, layout, &mut || Ok(()))
                    .unwrap();
                logits.extend(
                    out.iter()
                        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
                );
            }
            logits
        };
        for chunk in [1, 9] {
            let together = run(BatchLayout::Together, chunk);
            for layout in [BatchLayout::Halves, BatchLayout::Auto] {
                let got = run(layout, chunk);
                assert_eq!(got.len(), together.len());
                for (i, (a, b)) in got.iter().zip(&together).enumerate() {
                    let what = format!("{} {layout:?}, chunk {chunk}, logits {i}", cfg.model_type);
                    if *tolerance == 0.0 {
                        let same = a.len() == b.len()
                            && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{what} differ");
                    } else {
                        let err = max_rel_diff(a, b);
                        assert!(err < *tolerance, "{what}: {err}");
                    }
                }
            }
        }
    }
}

/// A batch run as halves stops where the caller's check between layers fails, and
/// says so; a sequence without tokens is named by its place in the whole batch.
#[test]
fn batch_halves_stop_when_asked() {
    use selfextend_core::model::{BatchLayout, SequenceStep};
    let model = tiny_model(&tiny_config(2, false), 23);
    let decoder = model.decoder();
    let params = model.attention_params(None);
    let tokens = ids(8, model.config().vocab_size, 24);
    let mut caches: Vec<_> = (0..8).map(|_| decoder.new_cache(4)).collect();
    let mut steps: Vec<SequenceStep> = caches
        .iter_mut()
        .zip(&tokens)
        .map(|(cache, id)| SequenceStep {
            ids: std::slice::from_ref(id),
            cache,
            params: &params,
            logits_for: LogitsFor::Last,
        })
        .collect();
    let mut calls = 0;
    let err = decoder
        .forward_batch_with(&mut steps, BatchLayout::Halves, &mut || {
            calls += 1;
            Err(Error::Interrupted)
        })
        .unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
    assert_eq!(calls, 1);
    // The first half stopped after its first layer (the side half stops at its next
    // check, wherever it had got to).
    for step in &mut steps[..4] {
        assert_eq!(step.cache.layer_mut(0).len(), 1);
        assert_eq!(step.cache.layer_mut(1).len(), 0);
    }

    steps[6].ids = &[];
    let err = decoder
        .forward_batch_with(&mut steps, BatchLayout::Halves, &mut || Ok(()))
        .unwrap_err();
    assert!(err.to_string().contains("sequence 6 of the batch"), "{err}");
}

#[test]
fn linear_cost_counts_every_weight_and_the_bytes_read() {
    let cfg = Config {
        intermediate_size: 64,
        ..tiny_config(2, false)
    };
    // Per layer q, k, v, o, gate, up, down; then the LM head.
    let (h, i, d) = (32, 64, 8);
    let per_layer = h * 4 * d + 2 * h * 2 * d + h * 4 * d + 3 * h * i;
    let weights = cfg.num_hidden_layers * per_layer + cfg.vocab_size * h;
    let dense = tiny_model(&cfg, 7).decoder().linear_cost();
    assert_eq!(dense.weights, weights);
    assert_eq!(dense.bytes, 4 * weights);
    // Q8_0: a 2-byte scale per 32 one-byte codes. The packed kernel reads rows in
    // tiles of 16, so the 50-row LM head reads 14 rows of padding.
    let q8 = tiny_quantized_model(&cfg, 7).decoder().linear_cost();
    assert_eq!(q8.weights, weights);
    assert_eq!(q8.bytes, (weights + 14 * h) / 32 * 34, "{q8:?}");
}

#[test]
fn a_load_checks_before_every_tensor_and_stops_when_asked() {
    use selfextend_core::loader::Weights;
    use selfextend_core::model::Decoder;
    use std::cell::Cell;

    let cfg = tiny_config(2, false);
    let source = common::tiny_weights(&cfg, 3);
    let calls = Cell::new(0);
    let count = || {
        calls.set(calls.get() + 1);
        Ok(())
    };
    let weights = Weights::new(&source, DType::F32, &candle_core::Device::Cpu);
    Decoder::load(&weights.clone().with_check(&count), &cfg).unwrap();
    // At least once a tensor: a quantized weight is asked for as blocks first.
    assert!(calls.get() >= source.len(), "{} checks", calls.get());

    let calls = Cell::new(0);
    let stop_at_third = || {
        calls.set(calls.get() + 1);
        if calls.get() == 3 {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    };
    let err = Decoder::load(&weights.with_check(&stop_at_third), &cfg).unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
    assert_eq!(calls.get(), 3);
}
