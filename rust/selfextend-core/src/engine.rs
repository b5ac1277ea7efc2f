//! Continuous batching: one scheduler thread owns the running generations and, at
//! every step, runs one [`Decoder::forward_batch`](crate::model::Decoder::forward_batch)
//! over a decode row for each of them plus a bounded slice of pending prompts (chunked
//! prefill, as in Orca and vLLM), so a long prompt arriving does not stall the streams
//! already running.
//!
//! Requests enter through [`Engine::submit`], which validates them, and leave through a
//! channel of [`Event`]s. Each request keeps its own sampling, stop strings and
//! SelfExtend / RoPE settings; sequences with different settings share a step, and
//! greedy results do not depend on what else is in the batch. A request is admitted
//! while the KV caches of the running ones fit the memory budget and queued
//! otherwise; dropping its receiver cancels it and frees its cache at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::generate::{Completion, GenerateOptions, Generation};
use crate::kv_cache::KvCache;
use crate::model::{LogitsFor, Model, SequenceStep};

/// How the engine batches and what it admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Sequences running at once; more wait in the queue.
    pub max_batch: usize,
    /// Prompt tokens prefilled per step, across the sequences still in their prompt,
    /// and the longest prefill chunk. Smaller keeps decode latency low while a long
    /// prompt is read; larger reads it in fewer steps.
    pub prefill_tokens_per_step: usize,
    /// Bytes the KV caches of running sequences may reserve together (each request
    /// reserves room for its prompt and `max_new_tokens`); `None` is the model's
    /// `max_memory` or, without one, what the system has available at start.
    pub kv_budget: Option<usize>,
    /// Requests waiting for admission at most; more are refused with
    /// [`Error::Overloaded`].
    pub max_queue: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch: 8,
            prefill_tokens_per_step: 256,
            kv_budget: None,
            max_queue: 64,
        }
    }
}

/// What a request's receiver gets: text as it becomes final, then one `Done` (or one
/// `Failed`).
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Completion),
    Failed(Error),
}

/// Counters for monitoring (Prometheus `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    pub queued: usize,
    pub running: usize,
    pub kv_bytes_reserved: usize,
    pub kv_budget: usize,
    pub prompt_tokens_total: u64,
    pub generated_tokens_total: u64,
    pub requests_finished_total: u64,
    pub steps_total: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicUsize,
    running: AtomicUsize,
    kv_bytes: AtomicUsize,
    prompt_tokens: AtomicU64,
    generated: AtomicU64,
    finished: AtomicU64,
    steps: AtomicU64,
}

struct Request {
    generation: Generation,
    /// KV-cache bytes the request reserves while it runs.
    kv_bytes: usize,
    events: Sink,
    cancelled: Arc<AtomicBool>,
}

/// Where a request's events go: its own bounded channel, or a channel shared by many
/// requests (an asyncio event pump), tagged with the request's id.
enum Sink {
    Own(SyncSender<Event>),
    Shared(u64, Sender<(u64, Event)>),
}

impl Sink {
    /// Sends `event`, waiting while an own channel's buffer is full; false when the
    /// reader is gone (the request was cancelled).
    fn send(&self, event: Event) -> bool {
        match self {
            Self::Own(tx) => match tx.try_send(event) {
                Ok(()) => true,
                Err(TrySendError::Disconnected(_)) => false,
                Err(TrySendError::Full(event)) => tx.send(event).is_ok(),
            },
            Self::Shared(id, tx) => tx.send((*id, event)).is_ok(),
        }
    }

    /// Sends a final event without waiting on a full buffer.
    fn send_last(&self, event: Event) {
        match self {
            Self::Own(tx) => {
                let _ = tx.try_send(event);
            }
            Self::Shared(id, tx) => {
                let _ = tx.send((*id, event));
            }
        }
    }
}

/// Cancels a request submitted with [`Engine::submit_shared`] when dropped or told to.
#[derive(Debug)]
pub struct CancelHandle {
    cancelled: Arc<AtomicBool>,
}

impl CancelHandle {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A submitted request: its events, in order, and cancellation. Dropping the handle
/// cancels the request; its cache is freed at the scheduler's next step.
#[derive(Debug)]
pub struct RequestHandle {
    events: Receiver<Event>,
    cancelled: Arc<AtomicBool>,
}

impl RequestHandle {
    /// The next event, waiting for it; `None` after the last one.
    pub fn recv(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// The next event, waiting at most `timeout`: `Ok(None)` after the last one,
    /// `Err(())` when none came in time.
    #[allow(clippy::result_unit_err)]
    pub fn recv_timeout(&self, timeout: Duration) -> std::result::Result<Option<Event>, ()> {
        match self.events.recv_timeout(timeout) {
            Ok(event) => Ok(Some(event)),
            Err(RecvTimeoutError::Disconnected) => Ok(None),
            Err(RecvTimeoutError::Timeout) => Err(()),
        }
    }

    /// Stops the request; the receiver gets no more events after those already sent.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Runs the request to its end and returns the completion.
    pub fn wait(self) -> Result<Completion> {
        while let Some(event) = self.recv() {
            match event {
                Event::Text(_) => {}
                Event::Done(completion) => return Ok(completion),
                Event::Failed(e) => return Err(e),
            }
        }
        Err(Error::Interrupted)
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

enum Command {
    Submit(Box<Request>),
    Shutdown,
}

/// A running engine; dropping it stops the scheduler thread after the current step
/// and fails the requests still in it.
pub struct Engine {
    model: Arc<Model>,
    options: EngineOptions,
    budget: usize,
    commands: Sender<Command>,
    counters: Arc<Counters>,
    worker: Option<JoinHandle<()>>,
}

/// Events buffered per request before the scheduler waits for its reader: enough that
/// a slow reader does not stall the batch for a while, bounded so a reader that never
/// reads cannot grow memory without end.
const EVENT_BUFFER: usize = 4096;

impl Engine {
    /// Starts the scheduler thread for `model`.
    pub fn start(model: Arc<Model>, options: EngineOptions) -> Result<Self> {
        if options.max_batch == 0 || options.prefill_tokens_per_step == 0 {
            return Err(Error::invalid(
                "engine options",
                "max_batch and prefill_tokens_per_step must be >= 1",
            ));
        }
        // Without a limit, most of what is free: activations and the weights' working
        // set take the rest.
        let budget = options
            .kv_budget
            .or(model.max_memory())
            .or_else(|| crate::memory::available_bytes().map(|a| a / 10 * 9))
            .unwrap_or(usize::MAX);
        let (commands, inbox) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let scheduler = Scheduler {
            model: Arc::clone(&model),
            options,
            budget,
            inbox,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
            counters: Arc::clone(&counters),
            worked_since_idle: false,
        };
        let worker = std::thread::Builder::new()
            .name("selfextend-engine".into())
            .spawn(move || scheduler.run())
            .map_err(|e| Error::Engine {
                msg: format!("cannot start its thread: {e}"),
            })?;
        Ok(Self {
            model,
            options,
            budget,
            commands,
            counters,
            worker: Some(worker),
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn options(&self) -> EngineOptions {
        self.options
    }

    /// Validates a request and queues it; its events arrive on the returned handle.
    /// Fails at once, before any work, on bad arguments, on a request whose KV cache
    /// alone exceeds the budget (saying how many tokens would fit), and when the queue
    /// is full.
    pub fn submit(&self, prompt_ids: Vec<u32>, opts: GenerateOptions) -> Result<RequestHandle> {
        let (events, receiver) = mpsc::sync_channel(EVENT_BUFFER);
        let cancelled = self.enqueue(prompt_ids, opts, Sink::Own(events))?;
        Ok(RequestHandle {
            events: receiver,
            cancelled,
        })
    }

    /// [`Engine::submit`], with the events sent to `events` as `(id, event)`: one
    /// channel serves many requests.
    pub fn submit_shared(
        &self,
        prompt_ids: Vec<u32>,
        opts: GenerateOptions,
        id: u64,
        events: Sender<(u64, Event)>,
    ) -> Result<CancelHandle> {
        let cancelled = self.enqueue(prompt_ids, opts, Sink::Shared(id, events))?;
        Ok(CancelHandle { cancelled })
    }

    fn enqueue(
        &self,
        prompt_ids: Vec<u32>,
        opts: GenerateOptions,
        events: Sink,
    ) -> Result<Arc<AtomicBool>> {
        let total = prompt_ids.len().saturating_add(opts.max_new_tokens);
        let kv_bytes = self.kv_bytes_for(total);
        if kv_bytes > self.budget {
            let per_token = self.kv_bytes_for(1).max(1);
            return Err(Error::OutOfMemory {
                msg: format!(
                    "the prompt ({} tokens) and max_new_tokens ({}) need {kv_bytes} bytes of \
                     KV cache, more than the engine's budget of {} bytes: at most {} tokens fit",
                    prompt_ids.len(),
                    opts.max_new_tokens,
                    self.budget,
                    self.budget / per_token
                ),
            });
        }
        if self.counters.queued.load(Ordering::Relaxed) >= self.options.max_queue {
            return Err(Error::Overloaded {
                msg: format!(
                    "{} requests are already waiting (max_queue); try again later",
                    self.options.max_queue
                ),
            });
        }
        let generation = Generation::new(Arc::clone(&self.model), prompt_ids, opts)?;
        let cancelled = Arc::new(AtomicBool::new(false));
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        let request = Request {
            generation,
            kv_bytes,
            events,
            cancelled: Arc::clone(&cancelled),
        };
        if self
            .commands
            .send(Command::Submit(Box::new(request)))
            .is_err()
        {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Engine {
                msg: "the engine has stopped".into(),
            });
        }
        Ok(cancelled)
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.counters;
        EngineStats {
            queued: c.queued.load(Ordering::Relaxed),
            running: c.running.load(Ordering::Relaxed),
            kv_bytes_reserved: c.kv_bytes.load(Ordering::Relaxed),
            kv_budget: self.budget,
            prompt_tokens_total: c.prompt_tokens.load(Ordering::Relaxed),
            generated_tokens_total: c.generated.load(Ordering::Relaxed),
            requests_finished_total: c.finished.load(Ordering::Relaxed),
            steps_total: c.steps.load(Ordering::Relaxed),
        }
    }

    fn kv_bytes_for(&self, positions: usize) -> usize {
        let cfg = self.model.config();
        KvCache::bytes_for(
            positions,
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            self.model.kv_cache_dtype(),
        )
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// The scheduler thread's state.
struct Scheduler {
    model: Arc<Model>,
    options: EngineOptions,
    budget: usize,
    inbox: Receiver<Command>,
    waiting: VecDeque<Request>,
    running: Vec<Request>,
    /// KV bytes reserved by the running requests.
    reserved: usize,
    counters: Arc<Counters>,
    /// Whether a step ran since the batch was last empty (memory is released then).
    worked_since_idle: bool,
}

/// How long an idle scheduler waits for a command before checking again.
const IDLE_WAIT: Duration = Duration::from_millis(200);

impl Scheduler {
    fn run(mut self) {
        loop {
            if !self.receive() {
                break;
            }
            self.admit();
            if self.running.is_empty() {
                if std::mem::take(&mut self.worked_since_idle) {
                    crate::memory::release_free_memory();
                }
                continue;
            }
            self.worked_since_idle = true;
            // A bug must not leave every stream waiting forever: fail the batch and go on.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if let Err(panic) = stepped {
                let what = crate::error::panic_message(panic.as_ref()).to_string();
                for request in self.running.drain(..) {
                    let msg = format!("internal error (please report it): {what}");
                    request
                        .events
                        .send_last(Event::Failed(Error::Engine { msg }));
                }
                self.reserved = 0;
                self.publish();
            }
        }
        for request in self.waiting.drain(..).chain(self.running.drain(..)) {
            request.events.send_last(Event::Failed(Error::Interrupted));
        }
    }

    /// Takes new commands: all that are there while work is running, else waits for
    /// one. Returns false on shutdown.
    fn receive(&mut self) -> bool {
        let busy = !self.running.is_empty() || !self.waiting.is_empty();
        let first = if busy {
            match self.inbox.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        } else {
            match self.inbox.recv_timeout(IDLE_WAIT) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        };
        let mut next = first;
        while let Some(command) = next {
            match command {
                Command::Submit(request) => self.waiting.push_back(*request),
                Command::Shutdown => return false,
            }
            next = self.inbox.try_recv().ok();
        }
        true
    }

    /// Moves waiting requests into the batch, first come first served, while the batch
    /// has room and their KV caches fit the budget.
    fn admit(&mut self) {
        self.drop_cancelled_waiting();
        while let Some(front) = self.waiting.front() {
            if self.running.len() >= self.options.max_batch
                || self.reserved + front.kv_bytes > self.budget
            {
                break;
            }
            let request = self.waiting.pop_front().expect("front exists");
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            self.counters
                .prompt_tokens
                .fetch_add(request.generation.prompt_len() as u64, Ordering::Relaxed);
            self.reserved += request.kv_bytes;
            self.running.push(request);
        }
        self.publish();
    }

    /// One batched forward call: the pending token of every decoding sequence, and the
    /// next prompt chunk of prefilling ones, oldest first, while they fit in
    /// `prefill_tokens_per_step` (the first always goes, so every prompt progresses).
    ///
    /// A sequence's chunks are `min(its chunk_size, prefill_tokens_per_step)` long
    /// whatever else runs: chunk boundaries, and so its logits, do not depend on the
    /// batch (a quantized layer picks its matmul by chunk length).
    fn step(&mut self) {
        let start = Instant::now();
        let mut prefill_left = self.options.prefill_tokens_per_step;
        let mut prefilled_any = false;
        let mut inputs = Vec::with_capacity(self.running.len());
        for (i, request) in self.running.iter().enumerate() {
            let g = &request.generation;
            let budget = match g.is_prefilling() {
                true => g.chunk_size().min(self.options.prefill_tokens_per_step),
                false => 1,
            };
            let Some((ids, params)) = g.next_input(budget) else {
                continue;
            };
            if g.is_prefilling() {
                if prefilled_any && ids.len() > prefill_left {
                    continue;
                }
                prefill_left = prefill_left.saturating_sub(ids.len());
                prefilled_any = true;
            }
            inputs.push((i, ids.to_vec(), params));
        }
        let mut results: Vec<(usize, usize, Result<Vec<f32>>)> = Vec::new();
        if !inputs.is_empty() {
            let indices: Vec<usize> = inputs.iter().map(|(i, _, _)| *i).collect();
            let model = Arc::clone(&self.model);
            let mut caches = caches_of(&mut self.running, &indices);
            let mut steps: Vec<SequenceStep> = inputs
                .iter()
                .zip(caches.iter_mut())
                .map(|((_, ids, params), cache)| SequenceStep {
                    ids,
                    cache,
                    params,
                    logits_for: LogitsFor::Last,
                })
                .collect();
            let outcome = model.decoder().forward_batch(&mut steps, &mut || Ok(()));
            match outcome.and_then(|logits| {
                logits
                    .into_iter()
                    .map(|l| Ok(l.flatten_all()?.to_vec1::<f32>()?))
                    .collect::<Result<Vec<_>>>()
            }) {
                Ok(logits) => {
                    for ((i, ids, _), l) in inputs.iter().zip(logits) {
                        results.push((*i, ids.len(), Ok(l)));
                    }
                }
                Err(e) => {
                    // The caches of this step are now partly written: fail its sequences.
                    let msg = e.to_string();
                    for (i, ids, _) in &inputs {
                        let err = Error::Candle(candle_core::Error::Msg(msg.clone()));
                        results.push((*i, ids.len(), Err(err)));
                    }
                }
            }
        }
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let seconds = start.elapsed().as_secs_f64();
        let mut failed = vec![false; self.running.len()];
        for (i, n, logits) in results {
            let request = &mut self.running[i];
            let outcome = logits.and_then(|l| request.generation.accept(n, l, seconds));
            match outcome {
                Ok(text) => {
                    if !request.generation.is_prefilling() {
                        self.counters.generated.fetch_add(1, Ordering::Relaxed);
                    }
                    let text = text.unwrap_or_default();
                    if !text.is_empty() && !request.events.send(Event::Text(text)) {
                        request.cancelled.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    request.events.send_last(Event::Failed(e));
                    failed[i] = true;
                }
            }
        }
        // Finished, failed and cancelled requests leave the batch and free their cache;
        // the finished hear so once the stats no longer count them.
        let mut kept = Vec::with_capacity(self.running.len());
        let mut done = Vec::new();
        for (i, request) in std::mem::take(&mut self.running).into_iter().enumerate() {
            let cancelled = request.cancelled.load(Ordering::Relaxed);
            let finished = request.generation.is_finished();
            if !(failed[i] || cancelled || finished) {
                kept.push(request);
                continue;
            }
            self.reserved -= request.kv_bytes;
            if finished && !failed[i] && !cancelled {
                self.counters.finished.fetch_add(1, Ordering::Relaxed);
                let Request {
                    generation, events, ..
                } = request;
                done.push((events, generation.into_completion()));
            }
        }
        self.running = kept;
        self.drop_cancelled_waiting();
        self.publish();
        for (events, completion) in done {
            events.send(Event::Done(completion));
        }
    }

    /// Cancelled requests that never ran leave the queue too.
    fn drop_cancelled_waiting(&mut self) {
        let before = self.waiting.len();
        self.waiting
            .retain(|r| !r.cancelled.load(Ordering::Relaxed));
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.counters.queued.fetch_sub(gone, Ordering::Relaxed);
        }
    }

    fn publish(&self) {
        self.counters
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.counters
            .kv_bytes
            .store(self.reserved, Ordering::Relaxed);
    }
}

/// The caches of the running requests at `indices` (ascending), borrowed at once.
fn caches_of<'a>(running: &'a mut [Request], indices: &[usize]) -> Vec<&'a mut KvCache> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = running;
    let mut offset = 0;
    for &i in indices {
        let (_, tail) = rest.split_at_mut(i - offset);
        let (head, tail) = tail.split_first_mut().expect("index in range");
        out.push(head.generation.cache_mut());
        rest = tail;
        offset = i + 1;
    }
    out
}
