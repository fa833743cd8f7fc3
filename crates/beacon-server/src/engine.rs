//! The engine layer: one model, a request queue, and a step scheduler.
//!
//! Requests enter a bounded queue. Worker threads take them, but only the worker holding the
//! *turn* runs the model; each worker gives the turn back after every prefill step (one window)
//! and every decoded token, and queues again behind the others (a FIFO ticket lock). So one compute
//! lane is shared round-robin at step granularity: concurrent streams progress fairly, a long
//! prefill does not stall the other streams, and the model never runs two forwards at once (on a
//! CPU, parallel forwards would only fight over the same cores). Batching several sequences into
//! one forward would need a batched session; on CPU, decode is bound by reading the weights once
//! per token per sequence, and this design leaves that to a later change.
//!
//! A request's prompt is matched against the [`ConversationCache`]: the longest held prefix is
//! continued and only the rest of the prompt runs through the model (`tokens_encoded`).
//! Generation runs [`beacon::generate::generate`] unchanged, so the server's output is the CLI's.

use crate::cache::ConversationCache;
use crate::metrics::Metrics;
use beacon::context_file::Snapshot;
use beacon::generate::{generate, FinishReason, GenerateOptions, SamplingParams};
use beacon::model::Model;
use beacon::session::FeedOptions;
use beacon::tokenizer::{ChatMessage, Tokenizer};
use beacon::{BeaconConfig, Mode, Session, Want};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// What to run the model on (already checked by the HTTP layer for shape; tokens are checked here).
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Plain text (completions).
    Text(String),
    /// Token ids (completions with an id array).
    Ids(Vec<u32>),
    /// Messages rendered with the model's chat template plus the assistant prefix.
    Chat(Vec<ChatMessage>),
}

/// One generation request.
pub struct Job {
    pub prompt: PromptInput,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Where the events go. Dropping the receiver cancels the job (client gone).
    pub events: UnboundedSender<Event>,
}

/// What the engine reports about a job, in order: `Started`, `Text`*, then `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Started(Started),
    Text(String),
    Done(Done),
    Failed(EngineError),
}

#[derive(Debug, Clone)]
pub struct Started {
    pub prompt_tokens: usize,
    /// Prompt tokens that will run through the model (the rest came from held memory).
    pub tokens_encoded: usize,
    pub queue_seconds: f64,
}

/// Summary of a finished job.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Done {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub memory: MemoryReport,
}

/// The `beacon` block of a response: what memory this request ran on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryReport {
    /// Tokens per memory entry after this request (the effective compression ratio).
    pub ratio: f64,
    /// Compression ratio of the open window, if one is open.
    pub window_ratio: Option<usize>,
    /// Entries held: sink + beacons + open window.
    pub memory_entries: usize,
    pub kv_bytes: usize,
    /// What full attention would hold for the same tokens.
    pub kv_bytes_full: usize,
    /// Prompt tokens run through the model for this request.
    pub tokens_encoded: usize,
    /// Prompt tokens continued from held memory.
    pub tokens_reused: usize,
    pub queue_seconds: f64,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is empty after tokenization")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens; this server accepts at most {max}")]
    PromptTooLong { tokens: usize, max: usize },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("cannot render or tokenize the prompt: {0}")]
    Prompt(String),
    #[error("the server is busy ({0} requests waiting); retry later")]
    Busy(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("generation failed: {0}")]
    Internal(String),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub mode: Mode,
    pub beacon: BeaconConfig,
    /// Dtype of new conversations' K/V (None: the model's compute dtype).
    pub kv_dtype: Option<candle_core::DType>,
    /// Byte budget of held conversations (0 = no reuse).
    pub cache_bytes: usize,
    /// Where conversations are saved at shutdown and restored from at start.
    pub persist_dir: Option<PathBuf>,
    pub max_prompt_tokens: usize,
    /// Requests running at once (each waits for its turn at every step).
    pub workers: usize,
    /// Requests waiting beyond those; more are refused with `Busy`.
    pub queue: usize,
}

/// A FIFO ticket lock: whoever took a ticket first computes next.
struct Turns {
    state: Mutex<(u64, u64)>, // (now serving, next ticket)
    changed: Condvar,
}

impl Turns {
    fn acquire(&self) -> Turn<'_> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = s.1;
        s.1 += 1;
        while s.0 != ticket {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        Turn { turns: self }
    }

    fn release(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += 1;
        self.changed.notify_all();
    }
}

/// Holding the turn. Dropping it passes the turn on.
struct Turn<'a> {
    turns: &'a Turns,
}

impl Turn<'_> {
    /// Let everyone already waiting run one step, then continue.
    fn yield_now(&mut self) {
        self.turns.release();
        let again = self.turns.acquire();
        std::mem::forget(again); // `self` stands for the new ticket
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.turns.release();
    }
}

struct Shared {
    model: Model,
    tokenizer: Tokenizer,
    fingerprint: String,
    eos_ids: Vec<u32>,
    settings: EngineSettings,
    cache: Mutex<ConversationCache>,
    turns: Turns,
    metrics: Arc<Metrics>,
}

/// Handle to the engine: submit jobs; dropping it (or [`Engine::shutdown`]) stops the workers.
pub struct Engine {
    queue: Mutex<Option<SyncSender<(Job, Instant)>>>,
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Engine {
    pub fn start(
        model: Model,
        tokenizer: Tokenizer,
        fingerprint: String,
        settings: EngineSettings,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let eos_ids = beacon::generate::stop_ids(&model.cfg.eos_token_ids, Some(&tokenizer));
        let mut cache = ConversationCache::new(settings.cache_bytes, &fingerprint);
        if let Some(dir) = &settings.persist_dir {
            let (loaded, skipped) = cache.restore_dir(dir)?;
            tracing::info!(
                "restored {loaded} saved conversations from {} ({skipped} skipped)",
                dir.display()
            );
        }
        let (tx, rx) = sync_channel::<(Job, Instant)>(settings.queue);
        let rx = Arc::new(Mutex::new(rx));
        let workers = settings.workers.max(1);
        let shared = Arc::new(Shared {
            model,
            tokenizer,
            fingerprint,
            eos_ids,
            settings,
            cache: Mutex::new(cache),
            turns: Turns {
                state: Mutex::new((0, 0)),
                changed: Condvar::new(),
            },
            metrics,
        });
        let handles = (0..workers)
            .map(|i| {
                let (shared, rx) = (shared.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("beacon-worker-{i}"))
                    .spawn(move || worker(&shared, &rx))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Engine {
            queue: Mutex::new(Some(tx)),
            shared,
            workers: Mutex::new(handles),
        })
    }

    /// Queue a job; refused when the queue is full or the engine is stopping.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = queue.as_ref() else {
            return Err(EngineError::ShuttingDown);
        };
        let m = &self.shared.metrics;
        m.queued.fetch_add(1, Ordering::Relaxed);
        match tx.try_send((job, Instant::now())) {
            Ok(()) => Ok(()),
            Err(e) => {
                m.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => EngineError::Busy(self.shared.settings.queue),
                    TrySendError::Disconnected(_) => EngineError::ShuttingDown,
                })
            }
        }
    }

    pub fn cache_stats(&self) -> (usize, usize) {
        let c = self.shared.cache.lock().unwrap_or_else(|p| p.into_inner());
        (c.len(), c.held_bytes())
    }

    /// Stop taking jobs, let the running ones finish, then save held conversations if asked.
    pub fn shutdown(&self) -> anyhow::Result<()> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        let handles = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
        if let Some(dir) = &self.shared.settings.persist_dir {
            let n = self
                .shared
                .cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .persist(dir)?;
            tracing::info!("saved {n} conversations to {}", dir.display());
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("engine shutdown: {e}");
        }
    }
}

fn worker(shared: &Shared, queue: &Mutex<Receiver<(Job, Instant)>>) {
    loop {
        let (job, enqueued) = {
            let rx = queue.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(queued) => queued,
                Err(_) => return, // engine stopped
            }
        };
        let m = &shared.metrics;
        m.queued.fetch_sub(1, Ordering::Relaxed);
        if job.events.is_closed() {
            m.cancelled.fetch_add(1, Ordering::Relaxed);
            continue; // the client left while queued
        }
        m.running.fetch_add(1, Ordering::Relaxed);
        let events = job.events.clone();
        if let Err(e) = run_job(shared, job, enqueued) {
            let _ = events.send(Event::Failed(e));
        }
        m.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Prompt token ids of a job.
fn tokenize(shared: &Shared, prompt: &PromptInput) -> Result<Vec<u32>, EngineError> {
    let tok = &shared.tokenizer;
    let ids = match prompt {
        PromptInput::Ids(ids) => ids.clone(),
        PromptInput::Text(text) => tok
            .encode(text, true)
            .map_err(|e| EngineError::Prompt(e.to_string()))?,
        PromptInput::Chat(messages) => {
            let text = tok
                .apply_chat_template(messages, true)
                .map_err(|e| EngineError::Prompt(e.to_string()))?;
            tok.encode(&text, true)
                .map_err(|e| EngineError::Prompt(e.to_string()))?
        }
    };
    let vocab = shared.model.cfg.vocab_size;
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(EngineError::TokenOutOfRange { id, vocab });
    }
    if ids.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let max = shared.settings.max_prompt_tokens;
    if ids.len() > max {
        return Err(EngineError::PromptTooLong {
            tokens: ids.len(),
            max,
        });
    }
    Ok(ids)
}

fn run_job(shared: &Shared, job: Job, enqueued: Instant) -> Result<(), EngineError> {
    let internal = |e: beacon::BeaconError| EngineError::Internal(e.to_string());
    let m = &shared.metrics;
    let ids = tokenize(shared, &job.prompt)?;
    let model = &shared.model;
    let mut turn = shared.turns.acquire();
    let queue_seconds = enqueued.elapsed().as_secs_f64();
    let reused = {
        let mut cache = shared.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.take_longest_prefix(&ids, model).map_err(internal)?
    };
    let (mut session, held_logits, tokens_reused) = match reused {
        Some(r) => {
            m.cache_hits.fetch_add(1, Ordering::Relaxed);
            (r.session, r.logits, r.tokens)
        }
        None => {
            m.cache_misses.fetch_add(1, Ordering::Relaxed);
            let mut s = Session::new(
                model,
                shared.settings.mode.clone(),
                shared.settings.beacon.clone(),
            );
            if let Some(dtype) = shared.settings.kv_dtype {
                s.set_kv_dtype(model, dtype).map_err(internal)?;
            }
            (s, None, 0)
        }
    };
    let suffix = &ids[tokens_reused..];
    let started = Started {
        prompt_tokens: ids.len(),
        tokens_encoded: suffix.len(),
        queue_seconds,
    };
    if job.events.send(Event::Started(started)).is_err() {
        m.cancelled.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    m.prompt_tokens
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    m.tokens_encoded
        .fetch_add(suffix.len() as u64, Ordering::Relaxed);
    m.tokens_reused
        .fetch_add(tokens_reused as u64, Ordering::Relaxed);

    let t0 = Instant::now();
    let logits = if suffix.is_empty() {
        held_logits.ok_or_else(|| {
            EngineError::Internal("held memory has no logits to continue from".into())
        })?
    } else {
        // Between prefill steps (one window each) the other streams get a turn.
        let logits = session
            .feed_with(
                model,
                suffix,
                Want::Last,
                FeedOptions::default(),
                &mut |_| turn.yield_now(),
            )
            .map_err(internal)?
            .ok_or_else(|| EngineError::Internal("the prompt produced no logits".into()))?;
        let mut cache = shared.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.enabled() {
            // The end of the prompt, with its logits: later turns, retries and replies that
            // re-tokenize differently continue from here.
            cache.put_saved(
                Snapshot::capture(&session, &shared.fingerprint, Some(&logits))
                    .map_err(internal)?,
            );
        }
        logits
    };
    let prefill_seconds = t0.elapsed().as_secs_f64();

    let opts = GenerateOptions {
        max_new_tokens: job.max_tokens,
        sampling: job.sampling.clone(),
        stop_strings: job.stop.clone(),
        eos_ids: shared.eos_ids.clone(),
    };
    let events = job.events.clone();
    let mut on_text = |text: &str| {
        let open = events.send(Event::Text(text.to_string())).is_ok();
        turn.yield_now();
        open
    };
    let t1 = Instant::now();
    let generation = generate(
        model,
        &mut session,
        &shared.tokenizer,
        &[],
        Some(logits),
        &opts,
        &mut on_text,
        &mut |_| {},
    )
    .map_err(internal)?;
    let decode_seconds = t1.elapsed().as_secs_f64();
    m.completion_tokens
        .fetch_add(generation.tokens.len() as u64, Ordering::Relaxed);
    m.decode_seconds_micros
        .fetch_add((decode_seconds * 1e6) as u64, Ordering::Relaxed);
    m.prefill_seconds_micros
        .fetch_add((prefill_seconds * 1e6) as u64, Ordering::Relaxed);
    if generation.finish == FinishReason::Cancelled {
        m.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    let layout = &session.layout();
    let memory = MemoryReport {
        ratio: session.tokens().len() as f64 / layout.context_len().max(1) as f64,
        window_ratio: layout.ratio,
        memory_entries: layout.context_len(),
        kv_bytes: session.kv_bytes_now(),
        kv_bytes_full: session.kv_bytes_full(),
        tokens_encoded: suffix.len(),
        tokens_reused,
        queue_seconds,
        prefill_seconds,
        decode_seconds,
    };
    let done = Done {
        finish: generation.finish,
        prompt_tokens: ids.len(),
        completion_tokens: generation.tokens.len(),
        memory,
    };
    {
        let mut cache = shared.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.put_live(session);
        m.cache_bytes
            .store(cache.held_bytes() as u64, Ordering::Relaxed);
        m.cache_entries.store(cache.len() as u64, Ordering::Relaxed);
    }
    drop(turn);
    let _ = job.events.send(Event::Done(done));
    Ok(())
}
