//! Sessions: feeding (interruptible), logits, generation (whole or streamed), statistics, saving.

use crate::errors::{guard, value, Fail, Kind};
use crate::Shared;
use beacon::cli_args::PenaltyArgs;
use beacon::context_file::LoadedContext;
use beacon::generate::{generate, FinishReason, GenerateOptions, SamplingParams};
use beacon::metrics::RunStats;
use beacon::session::{FeedOptions, Session, Want};
use candle_core::{DType, Tensor};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the last generation did (for `stats()`).
#[derive(Clone, Copy)]
struct LastGeneration {
    tokens: usize,
    seconds: f64,
    finish: FinishReason,
}

/// A session's memory plus what the binding keeps around it.
pub struct State {
    session: Session,
    /// Next-token logits after the last token the memory holds (1-D), when known.
    logits: Option<Tensor>,
    /// Generated tokens the memory has not read yet (the engine does not feed the last one); fed
    /// before anything else reads or extends the session.
    pending: Vec<u32>,
    /// Tokens read by `feed` and by prompts (what `beacon run` reports as `input_tokens`).
    input_tokens: usize,
    prefill_tokens: usize,
    prefill_seconds: f64,
    last: Option<LastGeneration>,
}

impl State {
    fn new(session: Session, logits: Option<Tensor>) -> Self {
        let input_tokens = session.tokens().len();
        State {
            session,
            logits,
            pending: Vec::new(),
            input_tokens,
            prefill_tokens: 0,
            prefill_seconds: 0.0,
            last: None,
        }
    }
}

/// Native session handle (see `beacon.Session`). The state sits in a mutex; a streaming generation
/// takes it out for as long as it runs (the session is then busy).
#[pyclass(frozen, module = "beacon._beacon")]
pub struct NativeSession {
    shared: Arc<Shared>,
    state: Arc<Mutex<Option<State>>>,
}

fn lock(m: &Mutex<Option<State>>) -> MutexGuard<'_, Option<State>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn busy() -> Fail {
    value("this session is busy: a streaming generation is still running (exhaust or close() its iterator first)")
}

/// The last row of `[rows, vocab]` logits (or the vector itself).
fn last_row(t: &Tensor) -> Result<Tensor, Fail> {
    Ok(if t.rank() == 2 {
        t.get(t.dim(0)? - 1)?
    } else {
        t.clone()
    })
}

/// Feed `tokens`, calling `keep_going` between the engine's steps; returns the logits `want` selects
/// (concatenated) or the reason it stopped.
fn feed_interruptibly(
    shared: &Shared,
    st: &mut State,
    tokens: &[u32],
    want: Want,
    keep_going: &mut dyn FnMut() -> bool,
) -> Result<Option<Tensor>, Fail> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let model = &shared.loaded.model;
    st.logits = None;
    let fed = st
        .session
        .feed_until(model, tokens, want, FeedOptions::default(), &mut |_| {
            keep_going()
        })?;
    if fed.interrupted {
        return Err(Fail::Msg(Kind::Other, "interrupted".into()));
    }
    let out = fed.logits;
    if let Some(l) = &out {
        if matches!(want, Want::Last | Want::From(_)) {
            st.logits = Some(last_row(l)?);
        }
    }
    Ok(out)
}

/// Feed the pending generated tokens, then `tokens`; `want` indexes `tokens`.
fn feed_with_pending(
    shared: &Shared,
    st: &mut State,
    tokens: &[u32],
    want: Want,
    keep_going: &mut dyn FnMut() -> bool,
) -> Result<Option<Tensor>, Fail> {
    if st.pending.is_empty() {
        return feed_interruptibly(shared, st, tokens, want, keep_going);
    }
    let p = st.pending.len();
    let mut all = std::mem::take(&mut st.pending);
    all.extend_from_slice(tokens);
    let w = match want {
        Want::From(i) => Want::From(i + p),
        w => w,
    };
    let out = feed_interruptibly(shared, st, &all, w, keep_going)?;
    Ok(match (out, want) {
        // Only the rows of `tokens`.
        (Some(l), Want::From(_)) if l.rank() == 2 => {
            let n = l.dim(0)?;
            let keep = n.min(tokens.len());
            Some(l.narrow(0, n - keep, keep)?)
        }
        (o, _) => o,
    })
}

/// Check Python's signal handlers (Ctrl-C) from a thread that released the GIL; a raised exception is
/// kept in `slot` and stops the work.
fn python_signals(slot: &mut Option<PyErr>) -> bool {
    match Python::attach(|py| py.check_signals()) {
        Ok(()) => true,
        Err(e) => {
            *slot = Some(e);
            false
        }
    }
}

/// Generation settings from the binding's arguments.
pub struct GenArgs {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
}

/// Prefill the prompt (interruptibly) and generate. `emit` receives text pieces; `keep_going` is asked
/// between prefill steps and after every token.
fn run_generation(
    shared: &Shared,
    st: &mut State,
    args: &GenArgs,
    keep_going: &mut dyn FnMut() -> bool,
    emit: &mut dyn FnMut(&str),
) -> Result<String, Fail> {
    let tok = shared.tokenizer()?;
    let model = &shared.loaded.model;
    let first = if args.prompt.is_empty() && st.pending.is_empty() {
        st.logits.clone().ok_or_else(|| {
            value("nothing to continue from: feed some text or give a prompt first")
        })?
    } else {
        let t0 = Instant::now();
        let l = feed_with_pending(shared, st, &args.prompt, Want::Last, keep_going)?
            .ok_or_else(|| value("the prompt produced no logits"))?;
        st.prefill_seconds += t0.elapsed().as_secs_f64();
        st.prefill_tokens += args.prompt.len();
        st.input_tokens += args.prompt.len();
        last_row(&l)?
    };
    let fed_before = st.session.tokens().len();
    let mut stopped = false;
    let g = generate(
        model,
        &mut st.session,
        tok,
        &[],
        Some(first),
        &args.opts,
        &mut |piece| {
            emit(piece);
            if keep_going() {
                true
            } else {
                stopped = true;
                false
            }
        },
        &mut |_| {},
    )?;
    // The engine does not read the last token it drew; keep it for the next feed.
    let fed = st.session.tokens().len() - fed_before;
    st.pending = g.tokens[fed.min(g.tokens.len())..].to_vec();
    st.logits = None;
    st.last = Some(LastGeneration {
        tokens: g.tokens.len(),
        seconds: g.decode_seconds,
        finish: g.finish,
    });
    if stopped {
        return Err(Fail::Msg(Kind::Other, "interrupted".into()));
    }
    Ok(g.text)
}

impl NativeSession {
    pub fn new(shared: Arc<Shared>, session: Session) -> Self {
        NativeSession {
            shared,
            state: Arc::new(Mutex::new(Some(State::new(session, None)))),
        }
    }

    pub fn restored(shared: Arc<Shared>, ctx: LoadedContext) -> Self {
        let logits = ctx.logits.and_then(|l| last_row(&l).ok());
        NativeSession {
            shared,
            state: Arc::new(Mutex::new(Some(State::new(ctx.session, logits)))),
        }
    }

    /// Run `f` on the state with the GIL released and Ctrl-C checked by `keep_going`.
    fn with_state<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Shared, &mut State, &mut dyn FnMut() -> bool) -> Result<T, Fail> + Send,
    ) -> PyResult<T> {
        let shared = &*self.shared;
        let state = &*self.state;
        let mut signal: Option<PyErr> = None;
        let r = py.detach(|| {
            let mut g = lock(state);
            let st = match g.as_mut() {
                Some(st) => st,
                None => return Err(busy()),
            };
            guard(|| f(shared, st, &mut || python_signals(&mut signal)))
        });
        match (r, signal) {
            (_, Some(e)) => Err(e),
            (Ok(v), None) => Ok(v),
            (Err(f), None) => Err(f.into_py(py)),
        }
    }
}

fn want_of(logits_from: Option<usize>) -> Want {
    match logits_from {
        None => Want::Last,
        Some(i) => Want::From(i),
    }
}

/// `[rows, vocab]` or `[vocab]` f32 logits → (bytearray, shape).
fn to_buffer<'py>(py: Python<'py>, t: &Tensor) -> PyResult<(Bound<'py, PyByteArray>, Vec<usize>)> {
    let conv = || -> Result<(Vec<f32>, Vec<usize>), Fail> {
        let t = t.to_dtype(DType::F32)?;
        Ok((t.flatten_all()?.to_vec1::<f32>()?, t.dims().to_vec()))
    };
    let (v, shape) = conv().map_err(|f| f.into_py(py))?;
    // SAFETY: f32 has no padding; the slice covers exactly the vector's bytes.
    let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) };
    Ok((PyByteArray::new(py, bytes), shape))
}

#[pymethods]
impl NativeSession {
    /// Read token ids. `logits_from`: also return the logits of the tokens from this index on.
    #[pyo3(signature = (tokens, logits_from=None))]
    fn feed<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
        logits_from: Option<usize>,
    ) -> PyResult<Option<(Bound<'py, PyByteArray>, Vec<usize>)>> {
        let n = tokens.len();
        // Rows from past the end: none, but the next-token logits are still kept.
        let none_wanted = matches!(logits_from, Some(i) if i >= n);
        let want = if none_wanted {
            Want::Last
        } else {
            want_of(logits_from)
        };
        let out = self.with_state(py, move |shared, st, keep_going| {
            let t0 = Instant::now();
            let r = feed_with_pending(shared, st, &tokens, want, keep_going);
            // Count what was read even when interrupted.
            st.prefill_seconds += t0.elapsed().as_secs_f64();
            st.prefill_tokens += n;
            st.input_tokens += n;
            r
        })?;
        let vocab = self.shared.loaded.model.cfg.vocab_size;
        match (logits_from, out) {
            (Some(_), _) if none_wanted => Ok(Some((PyByteArray::new(py, &[]), vec![0, vocab]))),
            (Some(_), Some(t)) => Ok(Some(to_buffer(py, &t)?)),
            (Some(_), None) => Ok(Some((PyByteArray::new(py, &[]), vec![0, vocab]))),
            (None, _) => Ok(None),
        }
    }

    /// Next-token logits after everything the session holds.
    fn logits<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyByteArray>, Vec<usize>)> {
        let t = self.with_state(py, |shared, st, keep_going| {
            if !st.pending.is_empty() {
                feed_with_pending(shared, st, &[], Want::Last, keep_going)?;
            }
            st.logits.clone().ok_or_else(|| {
                value(if st.session.tokens().is_empty() {
                    "no logits yet: feed some tokens first"
                } else {
                    "no logits: the last read ended without them (an interrupted feed, or a generation \
                     that stopped at an end-of-sequence token it did not read); feed more tokens first"
                })
            })
        })?;
        to_buffer(py, &t)
    }

    /// Generate; returns the text, or a `TokenStream` when `stream`.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_k=None, top_p=None, stop=Vec::new(),
        seed=0, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, dry=false,
        dry_multiplier=None, dry_base=None, dry_allowed_length=None, dry_range=None,
        dry_prompt_tail=None, stream=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: Vec<u32>,
        max_tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        stop: Vec<String>,
        seed: u64,
        repeat_penalty: f32,
        frequency_penalty: f32,
        presence_penalty: f32,
        dry: bool,
        dry_multiplier: Option<f32>,
        dry_base: Option<f32>,
        dry_allowed_length: Option<usize>,
        dry_range: Option<usize>,
        dry_prompt_tail: Option<usize>,
        stream: bool,
    ) -> PyResult<Py<PyAny>> {
        let penalties = PenaltyArgs {
            repeat_penalty,
            dry: false,
            dry_multiplier,
            dry_base,
            dry_allowed_length,
            dry_range,
            dry_prompt_tail,
        };
        let sampling = SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: repeat_penalty,
            frequency_penalty,
            presence_penalty,
            dry: penalties.dry_params(dry),
            seed,
        };
        sampling.validate().map_err(|e| Fail::from(e).into_py(py))?;
        let args = GenArgs {
            prompt,
            opts: GenerateOptions {
                max_new_tokens: max_tokens,
                sampling,
                stop_strings: stop,
                eos_ids: self.shared.eos_ids(),
            },
        };
        if !stream {
            let text = self.with_state(py, move |shared, st, keep_going| {
                run_generation(shared, st, &args, keep_going, &mut |_| {})
            })?;
            return Ok(text.into_pyobject(py)?.into_any().unbind());
        }
        // Streaming: the generation runs on its own thread with the state taken out of the session;
        // the iterator receives its pieces and puts Ctrl-C / early close through `cancel`.
        let st = lock(&self.state).take().ok_or_else(|| busy().into_py(py))?;
        let (tx, rx) = channel::<Msg>();
        let cancel = Arc::new(AtomicBool::new(false));
        let shared = self.shared.clone();
        let slot = self.state.clone();
        let flag = cancel.clone();
        let handle = std::thread::Builder::new()
            .name("beacon-generate".into())
            .spawn(move || {
                let mut st = st;
                let tx2 = tx.clone();
                let r = guard(|| {
                    run_generation(
                        &shared,
                        &mut st,
                        &args,
                        &mut || !flag.load(Ordering::SeqCst),
                        &mut |piece| {
                            let _ = tx2.send(Msg::Text(piece.to_string()));
                        },
                    )
                });
                *lock(&slot) = Some(st);
                let r = match r {
                    Err(_) if flag.load(Ordering::SeqCst) => Ok(()),
                    Err(f) => Err(f),
                    Ok(_) => Ok(()),
                };
                let _ = tx.send(Msg::Done(r));
            })
            .map_err(|e| {
                PyErr::from(Fail::Msg(
                    Kind::Other,
                    format!("cannot start a thread: {e}"),
                ))
            })?;
        let ts = TokenStream {
            rx: Mutex::new(Some(rx)),
            cancel,
            handle: Mutex::new(Some(handle)),
        };
        Ok(Py::new(py, ts)?.into_any())
    }

    /// `beacon run --stats-json`'s fields, as JSON.
    fn stats(&self, py: Python<'_>) -> PyResult<String> {
        let g = lock(&self.state);
        let st = g.as_ref().ok_or_else(|| busy().into_py(py))?;
        let s = &st.session;
        let (dt, ds, finish) = match st.last {
            Some(g) => (
                g.tokens,
                g.seconds,
                Some(format!("{:?}", g.finish).to_lowercase()),
            ),
            None => (0, 0.0, None),
        };
        let v = RunStats::of(
            s,
            st.input_tokens,
            (st.prefill_tokens, st.prefill_seconds),
            (dt, ds),
            finish,
        );
        let v = serde_json::to_string(&v).map_err(|e| Fail::Any(e.into()).into_py(py))?;
        Ok(v)
    }

    /// Every token the memory has read (prompt, fed text and the answers read back).
    fn tokens(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        let g = lock(&self.state);
        let st = g.as_ref().ok_or_else(|| busy().into_py(py))?;
        let mut t = st.session.tokens().to_vec();
        t.extend_from_slice(&st.pending);
        Ok(t)
    }

    /// Save the compressed context (atomically); returns what was written, as JSON.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<String> {
        self.with_state(py, move |shared, st, keep_going| {
            if !st.pending.is_empty() {
                feed_with_pending(shared, st, &[], Want::Last, keep_going)?;
            }
            if st.session.tokens().is_empty() {
                return Err(value("nothing to save: the session has read no tokens"));
            }
            let r = beacon::context_file::save_context(
                &path,
                &st.session,
                &shared.loaded.fingerprint,
                None,
                st.logits.as_ref(),
            )?;
            Ok(serde_json::to_string(&r).map_err(anyhow::Error::from)?)
        })
    }

    /// Forget everything read (the settings stay).
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        self.with_state(py, |shared, st, _| {
            st.session.reset(&shared.loaded.model);
            st.logits = None;
            st.pending.clear();
            st.input_tokens = 0;
            st.prefill_tokens = 0;
            st.prefill_seconds = 0.0;
            st.last = None;
            Ok(())
        })
    }
}

enum Msg {
    Text(String),
    Done(Result<(), Fail>),
}

/// Iterator over the text pieces of a streamed generation.
#[pyclass(frozen, module = "beacon._beacon")]
pub struct TokenStream {
    rx: Mutex<Option<Receiver<Msg>>>,
    cancel: Arc<AtomicBool>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl TokenStream {
    /// Stop the generation (if running) and wait for its thread, which puts the state back.
    fn finish(&self, py: Python<'_>) {
        self.cancel.store(true, Ordering::SeqCst);
        let h = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = h {
            py.detach(|| {
                let _ = h.join();
            });
        }
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            let r = py.detach(|| {
                let g = self.rx.lock().unwrap_or_else(|e| e.into_inner());
                g.as_ref()
                    .map(|rx| rx.recv_timeout(Duration::from_millis(50)))
            });
            match r {
                None => return Ok(None),
                Some(Ok(Msg::Text(s))) => return Ok(Some(s)),
                Some(Ok(Msg::Done(res))) => {
                    self.finish(py);
                    res.map_err(|f| f.into_py(py))?;
                    return Ok(None);
                }
                Some(Err(RecvTimeoutError::Timeout)) => {
                    if let Err(e) = py.check_signals() {
                        self.finish(py);
                        return Err(e);
                    }
                }
                Some(Err(RecvTimeoutError::Disconnected)) => {
                    self.finish(py);
                    return Ok(None);
                }
            }
        }
    }

    /// Stop the generation now; the session keeps what was generated so far.
    fn close(&self, py: Python<'_>) {
        self.finish(py);
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(h) = self
            .handle
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            // The thread never takes the GIL: joining while holding it cannot deadlock.
            let _ = h.join();
        }
    }
}
