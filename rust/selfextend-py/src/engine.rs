//! `Engine`: the continuous-batching engine, for asyncio and servers. Every request's
//! events arrive on one channel, which `next_events` drains with the GIL released; the
//! Python layer (`selfextend_rs._aio`) pumps them into asyncio queues.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use selfextend_core::engine::{CancelHandle, Engine, EngineOptions, Event};

use crate::errors::{invalid_argument, to_py};
use crate::model::{detached, Prompt, PyModel, Request, SelfExtendArg, Stop};
use crate::types::{PyCompletion, PyRopeScaling};

/// Events handed out per `next_events` call at most.
const EVENTS_PER_CALL: usize = 256;
/// How long `next_events` waits between checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// A continuous-batching engine over one model: requests submitted from any thread
/// share each decoding step, long prompts are prefilled in slices between them.
///
/// Most code uses it through `Model.agenerate` and `Model.astream`, or the server
/// (`selfextend-rs serve`); this class is the low-level interface they share.
#[pyclass(name = "Engine", module = "selfextend_rs", frozen)]
pub struct PyEngine {
    model: PyModel,
    engine: Engine,
    events: Mutex<Receiver<(u64, Event)>>,
    sender: Sender<(u64, Event)>,
}

/// A request submitted to an `Engine`; `cancel()` (or dropping it) stops it and frees
/// its KV cache at the engine's next step.
#[pyclass(name = "EngineRequest", module = "selfextend_rs", frozen)]
pub struct PyEngineRequest {
    handle: CancelHandle,
}

#[pymethods]
impl PyEngineRequest {
    /// Stops the request; no events follow those already sent.
    fn cancel(&self) {
        self.handle.cancel();
    }
}

fn positive(value: i64, name: &str) -> PyResult<usize> {
    usize::try_from(value)
        .ok()
        .filter(|&v| v >= 1)
        .ok_or_else(|| {
            invalid_argument(format!(
                "invalid argument `{name}`: must be >= 1, got {value}"
            ))
        })
}

#[pymethods]
impl PyEngine {
    /// Starts an engine (its scheduler thread) for `model`.
    ///
    /// Args:
    ///     model: The Model to serve.
    ///     max_batch: Sequences decoded together at most; more wait in a queue.
    ///     prefill_tokens_per_step: Prompt tokens read per step across new requests,
    ///         and the longest prefill chunk: smaller keeps running streams fluent
    ///         while a long prompt is read.
    ///     kv_budget: Bytes the running requests' KV caches may reserve together;
    ///         None is the model's max_memory, else 90% of the free memory at start.
    ///     max_queue: Requests waiting at most; submit() raises OverloadedError past it.
    #[new]
    #[pyo3(signature = (model, *, max_batch = 8, prefill_tokens_per_step = 256,
        kv_budget = None, max_queue = 64))]
    fn new(
        py: Python<'_>,
        model: PyRef<'_, PyModel>,
        max_batch: i64,
        prefill_tokens_per_step: i64,
        kv_budget: Option<i64>,
        max_queue: i64,
    ) -> PyResult<Self> {
        let options = EngineOptions {
            max_batch: positive(max_batch, "max_batch")?,
            prefill_tokens_per_step: positive(prefill_tokens_per_step, "prefill_tokens_per_step")?,
            kv_budget: kv_budget.map(|b| positive(b, "kv_budget")).transpose()?,
            max_queue: usize::try_from(max_queue).map_err(|_| {
                invalid_argument(format!(
                    "invalid argument `max_queue`: must be >= 0, got {max_queue}"
                ))
            })?,
        };
        let handle = model.handle();
        let inner = Arc::clone(handle.model());
        let engine = detached(py, false, None, |_| Engine::start(inner, options))?;
        let (sender, events) = mpsc::channel();
        Ok(Self {
            model: handle,
            engine,
            events: Mutex::new(events),
            sender,
        })
    }

    #[doc = concat!("Queues a generation whose events `next_events` returns under `request_id`.\n\nArgs:\n    request_id: The caller's id for this request's events.\n", crate::generation_doc!(), "\n\nReturns:\n    An EngineRequest, to cancel it.\n\nRaises:\n    OutOfMemoryError: the request's KV cache alone exceeds the engine's budget.\n    OverloadedError: the queue is full.")]
    #[pyo3(signature = (request_id, prompt, max_new_tokens = 128, *, temperature = 0.0,
        top_k = None, top_p = None, repetition_penalty = 1.0, seed = None, stop = None,
        self_extend = None, rope_scaling = None, chunk_size = None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        request_id: u64,
        prompt: Prompt,
        max_new_tokens: i64,
        temperature: f64,
        top_k: Option<i64>,
        top_p: Option<f64>,
        repetition_penalty: f64,
        seed: Option<i128>,
        stop: Option<Stop>,
        self_extend: Option<SelfExtendArg>,
        rope_scaling: Option<PyRopeScaling>,
        chunk_size: Option<i64>,
    ) -> PyResult<PyEngineRequest> {
        let Request { prompt, opts } = self.model.request(
            py,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            self_extend,
            rope_scaling,
            chunk_size,
        )?;
        let sender = self.sender.clone();
        let handle = detached(py, false, None, |_| {
            self.engine.submit_shared(prompt, opts, request_id, sender)
        })?;
        Ok(PyEngineRequest { handle })
    }

    /// Renders a conversation with the model's chat template into prompt token ids.
    ///
    /// Args:
    ///     messages: A list of {"role": ..., "content": ...} dicts.
    ///
    /// Returns:
    ///     The prompt's token ids, for submit().
    fn chat_prompt(
        &self,
        py: Python<'_>,
        messages: Vec<HashMap<String, String>>,
    ) -> PyResult<Vec<u32>> {
        match self.model.chat_prompt(py, messages)? {
            Prompt::Ids(ids) => Ok(ids.into_iter().map(|id| id as u32).collect()),
            Prompt::Text(_) => unreachable!("chat_prompt encodes the conversation"),
        }
    }

    /// Waits up to `timeout` seconds for events and returns those there are, as
    /// `(request_id, kind, payload)`: kind "text" with a str, "done" with the
    /// Completion (the request's last event), or "error" with the exception.
    ///
    /// Args:
    ///     timeout: Seconds to wait for the first event (0 returns at once).
    ///
    /// Returns:
    ///     A list, empty when nothing arrived in time.
    fn next_events(
        &self,
        py: Python<'_>,
        timeout: f64,
    ) -> PyResult<Vec<(u64, &'static str, Py<PyAny>)>> {
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(invalid_argument(format!(
                "invalid argument `timeout`: must be a number of seconds >= 0, got {timeout}"
            )));
        }
        // Waits in slices, so Ctrl-C interrupts a long timeout.
        let mut left = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::MAX);
        let events = loop {
            let slice = left.min(SIGNAL_POLL);
            match py.detach(|| self.receive(slice)) {
                Some(events) => break events,
                None if left <= slice => break Vec::new(),
                None => left -= slice,
            }
            py.check_signals()?;
        };
        events
            .into_iter()
            .map(|(id, event)| {
                Ok(match event {
                    Event::Text(text) => (id, "text", text.into_pyobject(py)?.into_any().unbind()),
                    Event::Done(completion) => (
                        id,
                        "done",
                        Py::new(py, PyCompletion::from(completion))?.into_any(),
                    ),
                    Event::Failed(e) => (id, "error", to_py(e, false).into_value(py).into_any()),
                })
            })
            .collect()
    }

    /// Queue length, running sequences, KV-cache bytes reserved and the budget, and
    /// running totals of prompt tokens, generated tokens, finished requests and steps.
    #[getter]
    fn stats(&self) -> HashMap<&'static str, u64> {
        let s = self.engine.stats();
        HashMap::from([
            ("queued", s.queued as u64),
            ("running", s.running as u64),
            ("kv_bytes_reserved", s.kv_bytes_reserved as u64),
            ("kv_budget", s.kv_budget.min(u64::MAX as usize) as u64),
            ("prompt_tokens_total", s.prompt_tokens_total),
            ("generated_tokens_total", s.generated_tokens_total),
            ("requests_finished_total", s.requests_finished_total),
            ("steps_total", s.steps_total),
        ])
    }

    /// The engine's settings, as passed to the constructor (kv_budget resolved).
    #[getter]
    fn options(&self) -> HashMap<&'static str, u64> {
        let o = self.engine.options();
        HashMap::from([
            ("max_batch", o.max_batch as u64),
            ("prefill_tokens_per_step", o.prefill_tokens_per_step as u64),
            ("kv_budget", self.engine.stats().kv_budget as u64),
            ("max_queue", o.max_queue as u64),
        ])
    }
}

impl PyEngine {
    /// The events there are after waiting up to `wait` for the first; `None` when none
    /// came in time (an engine that has gone sends none, and returns at once).
    fn receive(&self, wait: Duration) -> Option<Vec<(u64, Event)>> {
        let receiver = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = match receiver.recv_timeout(wait) {
            Ok(event) => vec![event],
            Err(RecvTimeoutError::Timeout) => return None,
            Err(RecvTimeoutError::Disconnected) => return Some(Vec::new()),
        };
        while out.len() < EVENTS_PER_CALL {
            match receiver.try_recv() {
                Ok(event) => out.push(event),
                Err(_) => break,
            }
        }
        Some(out)
    }
}
