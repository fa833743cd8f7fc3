//! `beacon._beacon`: the native half of the `beacon` Python package (the Python half, in
//! `python/beacon/`, gives it its API: `Model`, `Session`, `chat`, `train`, `eval.ppl`).
//!
//! Every long call releases the GIL (`Python::detach`). Feeding goes through the engine's
//! interruptible feed (`Session::feed_until`): between its steps, and after every generated token,
//! the GIL is taken back for a moment to run Python's signal handlers, so Ctrl-C stops a long read or
//! an answer with `KeyboardInterrupt` and leaves the session holding what it read so far.

mod errors;
mod session;
mod tools;

use beacon::cli_args::{EngineArgs, ModelArgs};
use beacon::loader::{BeaconSource, Loaded};
use errors::{guard, value, Fail};
use pyo3::prelude::*;
use session::{NativeSession, TokenStream};
use std::path::PathBuf;
use std::sync::Arc;

/// A loaded model, shared by every session made from it.
pub struct Shared {
    pub loaded: Loaded,
}

impl Shared {
    pub fn tokenizer(&self) -> Result<&beacon::tokenizer::Tokenizer, Fail> {
        self.loaded
            .tokenizer
            .as_ref()
            .ok_or_else(|| value("this model has no tokenizer (tokenizer.json or GGUF metadata)"))
    }

    /// End-of-sequence ids: the tokenizer's and the config's, as `beacon run` stops on.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.loaded.stop_ids()
    }
}

/// Native model handle (see `beacon.Model`).
#[pyclass(frozen, module = "beacon._beacon")]
pub struct NativeModel {
    pub shared: Arc<Shared>,
}

/// Load a model as `beacon run -m PATH --beacon … --beacon-config … --dtype … --prefill-weights …
/// --memory-limit …` does (the default model, fetched on first use, when `path` is None). Returns the
/// model and a warning to show, if any.
#[pyfunction]
#[pyo3(signature = (path=None, beacon=None, beacon_config=None, dtype="auto".to_string(),
    untrained=false, prefill_weights="auto".to_string(), memory_limit=None))]
#[allow(clippy::too_many_arguments)]
fn load_model(
    py: Python<'_>,
    path: Option<PathBuf>,
    beacon: Option<PathBuf>,
    beacon_config: Option<PathBuf>,
    dtype: String,
    untrained: bool,
    prefill_weights: String,
    memory_limit: Option<String>,
) -> PyResult<(NativeModel, Option<String>)> {
    let args = ModelArgs {
        model: path,
        beacon_weights: beacon,
        beacon_config,
        untrained,
        dtype,
        prefill_weights,
        memory_limit,
    };
    // As `ModelArgs::load`, without printing the memory plan (`Model.memory_plan` has it).
    let loaded = py
        .detach(|| {
            guard(|| {
                let opts = args.load_options()?;
                Ok(beacon::loader::load_model(args.model.as_deref(), &opts)?)
            })
        })
        .map_err(|f| f.into_py(py))?;
    let warning = (loaded.beacon_source == BeaconSource::Initialised && !untrained).then(|| {
        format!(
            "no beacon weights found for {}: beacons are initialised from the backbone \
             (untrained); compressed quality will be poor",
            loaded.path.display()
        )
    });
    Ok((
        NativeModel {
            shared: Arc::new(Shared { loaded }),
        },
        warning,
    ))
}

#[pymethods]
impl NativeModel {
    /// Facts about the model as JSON: path, fingerprint, beacon source, config, beacon settings.
    fn info(&self) -> PyResult<String> {
        let l = &self.shared.loaded;
        let source = match &l.beacon_source {
            BeaconSource::Checkpoint => "checkpoint".to_string(),
            BeaconSource::File(p) => p.display().to_string(),
            BeaconSource::Initialised => "initialised".to_string(),
        };
        let v = serde_json::json!({
            "path": l.path.display().to_string(),
            "fingerprint": l.fingerprint,
            "beacon_source": source,
            "has_tokenizer": l.tokenizer.is_some(),
            "config": l.model.cfg,
            "beacon": l.beacon,
            "eos_ids": self.shared.eos_ids(),
            "memory_plan": l.plan.line(),
        });
        Ok(v.to_string())
    }

    /// Token ids of `text` (`special`: parse special tokens such as `<|im_start|>`).
    #[pyo3(signature = (text, special=false))]
    fn tokenize(&self, py: Python<'_>, text: &str, special: bool) -> PyResult<Vec<u32>> {
        let shared = &self.shared;
        py.detach(|| guard(|| Ok(shared.tokenizer()?.encode(text, special)?)))
            .map_err(|f| f.into_py(py))
    }

    /// Text of token ids.
    fn detokenize(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        let shared = &self.shared;
        let vocab = shared.loaded.model.cfg.vocab_size;
        py.detach(|| {
            guard(|| {
                let tok = shared.tokenizer()?;
                let limit = tok.vocab_size().max(vocab);
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= limit) {
                    return Err(value(format!(
                        "token id {bad} is outside the vocabulary (size {limit})"
                    )));
                }
                Ok(tok.decode(&ids)?)
            })
        })
        .map_err(|f| f.into_py(py))
    }

    /// The chat template applied to `(role, content)` messages.
    #[pyo3(signature = (messages, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: Vec<(String, String)>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let msgs: Vec<beacon::tokenizer::ChatMessage> = messages
            .into_iter()
            .map(|(r, c)| beacon::tokenizer::ChatMessage::new(r, c))
            .collect();
        guard(|| {
            Ok(self
                .shared
                .tokenizer()?
                .apply_chat_template(&msgs, add_generation_prompt)?)
        })
        .map_err(|f| f.into_py(py))
    }

    /// A fresh session, with the engine flags of `beacon run` (`--mode`, `--ratio`, `--window`,
    /// `--sink`, `--keep`, `--ratio-seed`, `--kv-dtype`, `--raw-tail`).
    #[pyo3(signature = (mode=None, ratio=None, window=None, sink=None, keep=None, ratio_seed=None, kv_dtype="f16".to_string(), raw_tail=None))]
    #[allow(clippy::too_many_arguments)]
    fn session(
        &self,
        py: Python<'_>,
        mode: Option<String>,
        ratio: Option<String>,
        window: Option<usize>,
        sink: Option<usize>,
        keep: Option<usize>,
        ratio_seed: Option<u64>,
        kv_dtype: String,
        raw_tail: Option<usize>,
    ) -> PyResult<NativeSession> {
        let args = EngineArgs {
            mode,
            ratio,
            window,
            sink,
            raw_tail,
            keep,
            ratio_seed,
            kv_dtype,
        };
        let l = &self.shared.loaded;
        let s = guard(|| Ok(args.options().session(&l.model, &l.beacon)?))
            .map_err(|f| f.into_py(py))?;
        Ok(NativeSession::new(self.shared.clone(), s))
    }

    /// A session restored from a saved context (`Session.save`, `beacon compress`).
    fn load_session(&self, py: Python<'_>, path: PathBuf) -> PyResult<NativeSession> {
        let shared = self.shared.clone();
        let l = &shared.loaded;
        let ctx = py
            .detach(|| {
                guard(|| {
                    Ok(beacon::context_file::load_context(
                        &path,
                        &l.model,
                        &l.fingerprint,
                    )?)
                })
            })
            .map_err(|f| f.into_py(py))?;
        Ok(NativeSession::restored(shared, ctx))
    }
}

#[pymodule]
fn _beacon(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeModel>()?;
    m.add_class::<NativeSession>()?;
    m.add_class::<TokenStream>()?;
    m.add_function(wrap_pyfunction!(load_model, m)?)?;
    m.add_function(wrap_pyfunction!(tools::train, m)?)?;
    m.add_function(wrap_pyfunction!(tools::eval_ppl, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
