//! Whole-model equivalences on tiny random Llamas: full prefill, chunked prefill and
//! token-by-token decode produce the same logits, with and without SelfExtend.

mod common;

use std::sync::Arc;

use common::{max_rel_diff, tiny_config, tiny_model, Rng};
use selfextend_core::generate::{generate, FinishReason, GenerateOptions};
use selfextend_core::model::LogitsFor;
use selfextend_core::{Error, SelfExtend};

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
        let model = tiny_model(&cfg, 7);
        let tokens = ids(70, cfg.vocab_size, 11);
        for se in [None, Some((2, 4)), Some((3, 5)), Some((4, 16))] {
            let se = se.map(|(g, w)| SelfExtend::new(g, w).unwrap());
            let full = model
                .logits(&tokens, se, Some(tokens.len()), &mut no_progress())
                .unwrap();
            for chunk in [1, 3, 16, 33] {
                let chunked = model
                    .logits(&tokens, se, Some(chunk), &mut no_progress())
                    .unwrap();
                let err = max_rel_diff(&chunked, &full);
                assert!(err < 1e-5, "kv {kv_heads} se {se:?} chunk {chunk}: {err}");
            }
            // Decode: prefill 10 tokens, then feed one at a time through the cache.
            let params = model.attention_params(se);
            let mut cache = model.llama().new_cache(4);
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
            assert!(err < 1e-5, "kv {kv_heads} se {se:?} decode: {err}");
        }
    }
}

#[test]
fn self_extend_changes_logits_only_past_the_window() {
    let cfg = tiny_config(2, false);
    let model = tiny_model(&cfg, 3);
    let vocab = cfg.vocab_size;
    let tokens = ids(64, vocab, 5);
    let vanilla = model
        .logits(&tokens, None, None, &mut no_progress())
        .unwrap();
    let wide = SelfExtend::new(4, 64).unwrap();
    assert_eq!(
        model
            .logits(&tokens, Some(wide), None, &mut no_progress())
            .unwrap(),
        vanilla
    );
    let (g, w) = (4, 8);
    let se = model
        .logits(
            &tokens,
            Some(SelfExtend::new(g, w).unwrap()),
            None,
            &mut no_progress(),
        )
        .unwrap();
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
        let logits = model.logits(&seq, se, None, &mut no_progress()).unwrap();
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
