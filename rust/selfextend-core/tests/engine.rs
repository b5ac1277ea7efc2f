//! The continuous-batching engine: results equal running each request alone, long
//! prompts are prefilled in slices while other streams keep decoding, and requests are
//! admitted, refused and cancelled as documented.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{tiny_config, tiny_mixed_config, tiny_model, tiny_quantized_model, Rng};
use selfextend_core::engine::{Engine, EngineOptions, Event};
use selfextend_core::generate::{generate, GenerateOptions};
use selfextend_core::sampling::SamplingParams;
use selfextend_core::{Config, Error, Model, RopeScaling, SelfExtend};

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| 2 + rng.below(vocab - 2) as u32).collect()
}

/// Requests with different prompts, lengths and settings: greedy, seeded sampling,
/// SelfExtend, a RoPE override and a stop string.
fn requests(vocab: usize) -> Vec<(Vec<u32>, GenerateOptions)> {
    let se = |g, w| Some(SelfExtend::new(g, w).unwrap());
    let opts = |max_new_tokens, self_extend, seed: Option<u64>| GenerateOptions {
        max_new_tokens,
        self_extend,
        sampling: SamplingParams {
            temperature: if seed.is_some() { 0.8 } else { 0.0 },
            seed,
            ..Default::default()
        },
        ..Default::default()
    };
    vec![
        (ids(5, vocab, 1), opts(12, None, None)),
        (ids(70, vocab, 2), opts(9, se(3, 5), None)),
        (ids(33, vocab, 3), opts(15, se(2, 8), Some(7))),
        (
            ids(20, vocab, 4),
            GenerateOptions {
                rope_scaling: Some(RopeScaling::Linear { factor: 2.0 }),
                ..opts(6, None, None)
            },
        ),
        (ids(1, vocab, 5), opts(20, se(4, 4), None)),
        (
            ids(12, vocab, 6),
            GenerateOptions {
                stop: vec!["w1".into()],
                ..opts(10, None, Some(3))
            },
        ),
    ]
}

fn check_engine_matches_generate(model: Model, options: EngineOptions) {
    let model = Arc::new(model);
    let vocab = model.config().vocab_size;
    let engine = Engine::start(Arc::clone(&model), options).unwrap();
    let handles: Vec<_> = requests(vocab)
        .into_iter()
        .map(|(prompt, opts)| engine.submit(prompt, opts).unwrap())
        .collect();
    let mut streamed = vec![String::new(); handles.len()];
    let mut done = vec![None; handles.len()];
    // Read the streams round-robin, as a server's handlers would.
    while done.iter().any(Option::is_none) {
        for (i, h) in handles.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            match h.recv_timeout(Duration::from_millis(1)) {
                Ok(Some(Event::Text(t))) => streamed[i].push_str(&t),
                Ok(Some(Event::Done(c))) => done[i] = Some(c),
                Ok(Some(Event::Failed(e))) => panic!("request {i} failed: {e}"),
                Ok(None) => panic!("request {i} ended without Done"),
                Err(()) => {}
            }
        }
    }
    for (i, ((prompt, opts), completion)) in requests(vocab).into_iter().zip(done).enumerate() {
        let completion = completion.unwrap();
        // The engine prefills in chunks of at most `prefill_tokens_per_step`.
        let chunk = opts
            .chunk_size
            .unwrap_or(512)
            .min(options.prefill_tokens_per_step);
        let opts = GenerateOptions {
            chunk_size: Some(chunk),
            ..opts
        };
        let alone = generate(&model, prompt, opts, &mut |_, _| Ok(())).unwrap();
        assert_eq!(completion.token_ids, alone.token_ids, "request {i}");
        assert_eq!(completion.finish_reason, alone.finish_reason, "request {i}");
        assert_eq!(completion.text, alone.text, "request {i}");
        assert_eq!(streamed[i], completion.text, "request {i}: streamed text");
    }
    let stats = engine.stats();
    assert_eq!(
        (stats.running, stats.queued, stats.kv_bytes_reserved),
        (0, 0, 0)
    );
    assert_eq!(stats.requests_finished_total, 6);
}

#[test]
fn batched_requests_give_what_each_gives_alone() {
    // Prefill slices of 16 tokens: the 70- and 33-token prompts take several steps.
    let options = EngineOptions {
        prefill_tokens_per_step: 16,
        ..Default::default()
    };
    check_engine_matches_generate(tiny_model(&tiny_config(2, false), 3), options);
    check_engine_matches_generate(tiny_model(&tiny_mixed_config(), 4), options);
    let quantized = Config {
        intermediate_size: 64,
        ..tiny_config(2, false)
    };
    check_engine_matches_generate(tiny_quantized_model(&quantized, 5), options);
    // A batch of two: the others queue and start as earlier ones finish.
    let small = EngineOptions {
        max_batch: 2,
        prefill_tokens_per_step: 40,
        ..Default::default()
    };
    check_engine_matches_generate(tiny_model(&tiny_config(1, true), 6), small);
}

#[test]
fn streams_keep_decoding_while_a_long_prompt_is_prefilled() {
    // No EOS, so the stream runs until it is dropped.
    let mut cfg = tiny_config(2, false);
    cfg.eos_token_ids.clear();
    let model = Arc::new(tiny_model(&cfg, 7));
    let vocab = cfg.vocab_size;
    let options = EngineOptions {
        prefill_tokens_per_step: 8,
        ..Default::default()
    };
    let engine = Engine::start(Arc::clone(&model), options).unwrap();
    let greedy = |n| GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    };
    let stream = engine.submit(ids(4, vocab, 8), greedy(1_000_000)).unwrap();
    let Some(Event::Text(_)) = stream.recv() else {
        panic!("the stream did not start");
    };
    // Drain what the stream produced so far, then send a 400-token prompt: 50 steps of
    // prefill in chunks of 8.
    while let Ok(Some(_)) = stream.recv_timeout(Duration::ZERO) {}
    let steps_before = engine.stats().steps_total;
    let long = engine.submit(ids(400, vocab, 9), greedy(1)).unwrap();
    assert_eq!(long.wait().unwrap().prompt_tokens, 400);
    let steps = engine.stats().steps_total - steps_before;
    let mut during = 0;
    while let Ok(Some(Event::Text(_))) = stream.recv_timeout(Duration::ZERO) {
        during += 1;
    }
    assert!(steps >= 50, "{steps} steps");
    // One token per step of the prefill (and at most a few steps more).
    assert!(
        during >= 50 && during <= steps as usize + 2,
        "{during} tokens in {steps} steps"
    );
}

#[test]
fn cancelling_frees_the_cache_and_others_finish() {
    let model = Arc::new(tiny_model(&tiny_config(2, false), 10));
    let vocab = model.config().vocab_size;
    let engine = Engine::start(Arc::clone(&model), EngineOptions::default()).unwrap();
    let long = GenerateOptions {
        max_new_tokens: 100_000,
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            ..Default::default()
        },
        ..Default::default()
    };
    // Tokens 0 and 1 are BOS/EOS: forbid nothing, but sample far from EOS often enough
    // that a long run is likely; the assertions below hold either way.
    let cancelled = engine.submit(ids(10, vocab, 11), long.clone()).unwrap();
    let kept = engine
        .submit(
            ids(10, vocab, 12),
            GenerateOptions {
                max_new_tokens: 30,
                ..Default::default()
            },
        )
        .unwrap();
    let _ = cancelled.recv();
    drop(cancelled);
    let completion = kept.wait().unwrap();
    assert!(!completion.token_ids.is_empty() || completion.finish_reason.as_str() == "eos");
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().running > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = engine.stats();
    assert_eq!((stats.running, stats.kv_bytes_reserved), (0, 0));
}

#[test]
fn admission_refuses_what_cannot_fit_and_queues_the_rest() {
    let model = Arc::new(tiny_model(&tiny_config(2, false), 12));
    let vocab = model.config().vocab_size;
    // 2 layers x 2 kv heads x 8 dims x 2 (k, v) x 4 bytes = 256 bytes per token.
    let options = EngineOptions {
        kv_budget: Some(256 * 100),
        max_batch: 1,
        max_queue: 1,
        ..Default::default()
    };
    let engine = Engine::start(Arc::clone(&model), options).unwrap();
    let greedy = |n| GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    };
    match engine.submit(ids(90, vocab, 1), greedy(20)) {
        Err(Error::OutOfMemory { msg }) => assert!(msg.contains("at most 100 tokens fit"), "{msg}"),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    match engine.submit(vec![], greedy(5)) {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // One runs, one waits; a third is refused while the queue is full.
    let first = engine.submit(ids(10, vocab, 2), greedy(60)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().running == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let second = engine.submit(ids(10, vocab, 3), greedy(5)).unwrap();
    match engine.submit(ids(10, vocab, 4), greedy(5)) {
        Err(Error::Overloaded { .. }) => {}
        Ok(_) if engine.stats().queued == 0 => {} // the first finished early (EOS)
        other => panic!("expected Overloaded, got {other:?}"),
    }
    first.wait().unwrap();
    second.wait().unwrap();
}

#[test]
fn requests_can_share_one_event_channel() {
    let model = Arc::new(tiny_model(&tiny_config(2, false), 14));
    let vocab = model.config().vocab_size;
    let engine = Engine::start(Arc::clone(&model), EngineOptions::default()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reqs = requests(vocab);
    let handles: Vec<_> = reqs
        .iter()
        .enumerate()
        .map(|(i, (p, o))| {
            engine
                .submit_shared(p.clone(), o.clone(), 100 + i as u64, tx.clone())
                .unwrap()
        })
        .collect();
    let mut text = vec![String::new(); reqs.len()];
    let mut done = 0;
    while done < reqs.len() {
        let (id, event) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let i = (id - 100) as usize;
        match event {
            Event::Text(t) => text[i].push_str(&t),
            Event::Done(c) => {
                assert_eq!(c.text, text[i], "request {i}");
                let (prompt, opts) = reqs[i].clone();
                let alone = generate(&model, prompt, opts, &mut |_, _| Ok(())).unwrap();
                assert_eq!(c.token_ids, alone.token_ids, "request {i}");
                done += 1;
            }
            Event::Failed(e) => panic!("request {i}: {e}"),
        }
    }
    drop(handles);
}
