//! Autoregressive generation: chunked prefill, then one token at a time from the KV
//! cache, with stop strings and incremental (streamable) text.

use std::sync::Arc;
use std::time::Instant;

use crate::attention::{AttentionParams, SelfExtend};
use crate::config::RopeScaling;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::model::{resolve_chunk_size, ChunkCallback, LogitsFor, LogitsHeld, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::StreamDecoder;

/// Positions a generation's KV cache reserves past its prompt. A larger
/// `max_new_tokens` grows the cache as tokens come, so a maximum the sequence never
/// reaches costs nothing, even where no memory budget can refuse it up front.
const RESERVE_AHEAD: usize = 8192;

#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; it is cut before the match.
    pub stop: Vec<String>,
    pub self_extend: Option<SelfExtend>,
    /// Replaces the model's own RoPE scaling for this generation.
    pub rope_scaling: Option<RopeScaling>,
    /// Prefill chunk length; `None` is [`crate::model::DEFAULT_CHUNK_SIZE`].
    pub chunk_size: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token (not included in the output).
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    /// The generated ids, without the prompt and without a final EOS.
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Completion {
    pub fn decode_tokens_per_second(&self) -> f64 {
        if self.decode_seconds > 0.0 {
            self.token_ids.len() as f64 / self.decode_seconds
        } else {
            0.0
        }
    }
}

/// One generation in progress. Drive it with [`Generation::prefill`] (optional: the
/// first step prefills) and [`Generation::step`] until it returns `None`; or, in a
/// batch with others, with [`Generation::next_input`], a batched forward call on its
/// [`Generation::cache_mut`], and [`Generation::accept`] (see [`crate::engine`]).
pub struct Generation {
    model: Arc<Model>,
    params: AttentionParams,
    chunk_size: usize,
    max_new_tokens: usize,
    stop: Vec<String>,
    sampler: Sampler,
    cache: KvCache,
    /// The prompt, then the generated ids.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// How many of `tokens` the cache holds; the rest (part of the prompt, or the last
    /// sampled id) has yet to run through the model.
    fed: usize,
    /// Logits of the last position, waiting to be sampled.
    next_logits: Option<Vec<f32>>,
    decoder: StreamDecoder,
    text: String,
    emitted: usize,
    finish: Option<FinishReason>,
    prefill_seconds: f64,
    decode_seconds: f64,
}

impl Generation {
    /// Validates everything up front, so that a bad request fails before any work.
    pub fn new(model: Arc<Model>, prompt_ids: Vec<u32>, opts: GenerateOptions) -> Result<Self> {
        model.check_ids(&prompt_ids)?;
        let chunk_size = resolve_chunk_size(opts.chunk_size)?;
        if opts.stop.iter().any(String::is_empty) {
            return Err(Error::invalid("stop", "stop strings must not be empty"));
        }
        let total = prompt_ids.len().saturating_add(opts.max_new_tokens);
        model.check_memory(total, chunk_size, LogitsHeld::LastRow)?;
        let sampler = Sampler::new(opts.sampling)?;
        let params = model.attention_params_with(opts.self_extend, opts.rope_scaling);
        let cache = model.new_cache(total.min(prompt_ids.len().saturating_add(RESERVE_AHEAD)));
        let decoder = model.tokenizer().stream_decoder(true);
        let prompt_len = prompt_ids.len();
        Ok(Self {
            model,
            params,
            chunk_size,
            max_new_tokens: opts.max_new_tokens,
            stop: opts.stop,
            sampler,
            cache,
            tokens: prompt_ids,
            prompt_len,
            fed: 0,
            next_logits: None,
            decoder,
            text: String::new(),
            emitted: 0,
            finish: (opts.max_new_tokens == 0).then_some(FinishReason::Length),
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
        })
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Runs the prompt through the model (once); `on_chunk` sees progress and may stop it.
    pub fn prefill(&mut self, on_chunk: &mut ChunkCallback<'_>) -> Result<()> {
        if self.fed > 0 || self.finish.is_some() {
            return Ok(());
        }
        let start = Instant::now();
        let logits = self.model.forward_chunked(
            &self.tokens,
            &mut self.cache,
            &self.params,
            self.chunk_size,
            LogitsFor::Last,
            on_chunk,
        )?;
        self.fed = self.tokens.len();
        self.next_logits = Some(logits);
        self.prefill_seconds = start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Produces one token. Returns the text that became final with it (possibly empty,
    /// while a partial character or a possible stop string is held back), or `None`
    /// once generation has ended and all text was returned.
    pub fn step(&mut self, on_chunk: &mut ChunkCallback<'_>) -> Result<Option<String>> {
        self.prefill(on_chunk)?;
        if self.finish.is_some() {
            return Ok(self.flush());
        }
        let start = Instant::now();
        if self.fed < self.tokens.len() {
            let logits = self.model.decoder().forward(
                &self.tokens[self.fed..],
                &mut self.cache,
                &self.params,
                LogitsFor::Last,
            )?;
            self.fed = self.tokens.len();
            self.next_logits = Some(logits.flatten_all()?.to_vec1::<f32>()?);
        }
        let out = self.sample();
        self.decode_seconds += start.elapsed().as_secs_f64();
        out
    }

    /// The tokens the model has yet to see, at most `budget` of them (the prompt in
    /// chunks, then each sampled id), with the settings to run them; `None` once the
    /// generation has finished. Run them on [`Generation::cache_mut`], asking for the
    /// logits of the last row, and hand those to [`Generation::accept`].
    pub fn next_input(&self, budget: usize) -> Option<(&[u32], AttentionParams)> {
        if self.finish.is_some() || self.next_logits.is_some() {
            return None;
        }
        let end = (self.fed + budget.max(1)).min(self.tokens.len());
        let params = match self.fed < self.prompt_len {
            // Length-dependent RoPE scaling sees the whole prompt in every chunk, as in
            // `Model::forward_chunked`.
            true => AttentionParams {
                rope_length: self.params.rope_length.or(Some(self.prompt_len)),
                ..self.params.clone()
            },
            false => self.params.clone(),
        };
        Some((&self.tokens[self.fed..end], params))
    }

    /// The prefill chunk length this generation was asked for.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Whether the prompt has not all been through the model yet.
    pub fn is_prefilling(&self) -> bool {
        self.fed < self.prompt_len
    }

    /// The KV cache [`Generation::next_input`]'s tokens run on.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// Takes the result of running the `n` tokens [`Generation::next_input`] gave, with
    /// `last_logits` the logits of the last of them, and `seconds` the time it took.
    /// Returns what [`Generation::step`] returns: text that became final (empty while
    /// a prompt is still being prefilled), or `None` once generation has ended.
    pub fn accept(
        &mut self,
        n: usize,
        last_logits: Vec<f32>,
        seconds: f64,
    ) -> Result<Option<String>> {
        let prefilling = self.is_prefilling();
        self.fed = (self.fed + n).min(self.tokens.len());
        if prefilling {
            self.prefill_seconds += seconds;
        } else {
            self.decode_seconds += seconds;
        }
        if self.finish.is_some() {
            return Ok(self.flush());
        }
        if self.fed < self.tokens.len() {
            return Ok(Some(String::new()));
        }
        self.next_logits = Some(last_logits);
        self.sample()
    }

    /// Samples the next id from the waiting logits and returns the text it settles.
    fn sample(&mut self) -> Result<Option<String>> {
        let mut logits = self
            .next_logits
            .take()
            .expect("prefill or the previous step leaves logits");
        let id = self.sampler.sample(&mut logits, &self.tokens);
        let piece = if self.model.config().eos_token_ids.contains(&id) {
            self.finish = Some(FinishReason::Eos);
            String::new()
        } else {
            self.tokens.push(id);
            self.decoder.step(id)?
        };
        self.text.push_str(&piece);
        if self.finish.is_none() {
            if let Some(at) = self.find_stop() {
                self.text.truncate(at);
                self.finish = Some(FinishReason::Stop);
            } else if self.tokens.len() - self.prompt_len >= self.max_new_tokens {
                self.finish = Some(FinishReason::Length);
            }
        }
        if self.finish.is_some() {
            return Ok(self.flush());
        }
        let safe = self.text.len() - self.held_back();
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok(Some(out))
    }

    /// Runs to the end and returns the result.
    pub fn run(mut self, on_chunk: &mut ChunkCallback<'_>) -> Result<Completion> {
        // Between tokens the callback is a cancellation point; prefill progress is
        // complete, so it sees (prompt, prompt) again.
        while self.step(on_chunk)?.is_some() {
            on_chunk(self.prompt_len, self.prompt_len)?;
        }
        Ok(self.into_completion())
    }

    /// The result so far (complete once `step` has returned `None`).
    pub fn into_completion(self) -> Completion {
        Completion {
            text: self.text,
            token_ids: self.tokens[self.prompt_len..].to_vec(),
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            prompt_tokens: self.prompt_len,
            prefill_seconds: self.prefill_seconds,
            decode_seconds: self.decode_seconds,
        }
    }

    /// At the end: settle the final text once, then hand out what is left of it.
    fn flush(&mut self) -> Option<String> {
        if self.emitted == usize::MAX {
            return None;
        }
        if self.finish != Some(FinishReason::Stop) {
            // The stream decoder may still hold the bytes of an unfinished character.
            let ids = &self.tokens[self.prompt_len..];
            if let Ok(full) = self.model.tokenizer().decode(ids, true) {
                if full.starts_with(&self.text) {
                    self.text = full;
                    if let Some(at) = self.find_stop() {
                        self.text.truncate(at);
                        self.finish = Some(FinishReason::Stop);
                    }
                }
            }
        }
        let rest = self
            .text
            .get(self.emitted..)
            .unwrap_or_default()
            .to_string();
        self.emitted = usize::MAX;
        Some(rest)
    }

    fn find_stop(&self) -> Option<usize> {
        self.stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
    }

    /// Length of the longest suffix of the text that could start a stop string.
    fn held_back(&self) -> usize {
        let text = &self.text[self.emitted..];
        self.stop
            .iter()
            .flat_map(|s| {
                (1..s.len().min(text.len() + 1))
                    .filter(|&n| s.is_char_boundary(n) && text.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0)
    }
}

/// Generates a completion for `prompt_ids` in one call.
pub fn generate(
    model: &Arc<Model>,
    prompt_ids: Vec<u32>,
    opts: GenerateOptions,
    on_chunk: &mut ChunkCallback<'_>,
) -> Result<Completion> {
    Generation::new(model.clone(), prompt_ids, opts)?.run(on_chunk)
}
