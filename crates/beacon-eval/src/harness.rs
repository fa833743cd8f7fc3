//! What every evaluation shares: the model flags, loading, a tokenizer that falls back to raw bytes
//! (the tiny test models have no tokenizer), the engine modes compared, greedy answering, progress
//! bars and the output files (JSON + markdown + meta).

use anyhow::{bail, Context, Result};
use beacon::cli_args::ModelArgs;
use beacon::loader::BeaconSource;
use beacon::options::EngineOptions;
use beacon::session::{FeedOptions, Session, Want};
use beacon::tokenizer::{ChatMessage, Tokenizer};
use beacon::Loaded;
use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Flags every subcommand takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seed of every random choice (samples, keys, values, positions, ratio draws).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Results directory (JSON, markdown table, PNG plot).
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Where to write the JSON records. Default: OUT/<subcommand>.json.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// At most N samples (files, prompts) per task and length.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Small grids for CI and documentation (minutes, not hours).
    #[arg(long)]
    pub quick: bool,
    /// Data directory. Default: $BEACON_DATA, else ../shared/data (from the working directory or the repository).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Skip the PNG plot.
    #[arg(long)]
    pub no_plot: bool,
}

/// Which engine modes to compare.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModeArgs {
    /// Modes: full, window-only (sink + open beacon window, no memory), truncate, streaming, beacon.
    /// Default: full, truncate, streaming, beacon (efficiency: full,beacon).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Beacon ratios: integers dividing the beacon window, adapt, adapt-N, random. Default:
    /// 2,4,8,16,32,adapt (--quick: 8,adapt).
    #[arg(long, value_delimiter = ',')]
    pub ratios: Vec<String>,
    /// Tokens of K/V kept by truncate and streaming (several = several runs). Default: the native window.
    #[arg(long, value_delimiter = ',')]
    pub keep: Vec<usize>,
    /// Beacon window (raw tokens; also window-only's). Default: the model's beacon config.
    #[arg(long)]
    pub window: Option<usize>,
    /// Raw tails (`beacon run --raw-tail`): each beacon ratio also runs with the last N raw tokens
    /// of the previous window kept (several = several runs; 0 = none), labelled `beacon-x8+tail128`;
    /// equal-memory baselines follow each. Default: the model's beacon config only.
    #[arg(long = "raw-tail", value_delimiter = ',')]
    pub raw_tails: Vec<usize>,
    /// Equal-memory baselines: for each integer beacon ratio r, also run truncate and streaming
    /// (those among --modes; both when neither is) keeping as many K/V entries as beacon ×r held at
    /// its peak at the same length (measured from the beacon run), labelled `truncate@xr` and
    /// `streaming@xr`. Default (ppl, needle): on when beacon and truncate or streaming are both
    /// selected; `--equal-memory=false` turns it off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub equal_memory: Option<bool>,
}

pub const DEFAULT_MODES: [&str; 4] = ["full", "truncate", "streaming", "beacon"];
pub const DEFAULT_RATIOS: [&str; 6] = ["2", "4", "8", "16", "32", "adapt"];
pub const QUICK_RATIOS: [&str; 2] = ["8", "adapt"];

/// Fill unset `--modes/--ratios` with defaults.
pub fn with_defaults(args: &ModeArgs, modes: &[&str], quick: bool) -> ModeArgs {
    let mut a = args.clone();
    if a.modes.is_empty() {
        a.modes = modes.iter().map(|s| s.to_string()).collect();
    }
    if a.ratios.is_empty() {
        let r: &[&str] = if quick {
            &QUICK_RATIOS
        } else {
            &DEFAULT_RATIOS
        };
        a.ratios = r.iter().map(|s| s.to_string()).collect();
    }
    a
}

/// How an evaluated configuration keeps its context (`--modes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalMode {
    Full,
    /// The sink and the open beacon window: no memory of closed windows.
    WindowOnly,
    Truncate,
    Streaming,
    Beacon,
}

impl EvalMode {
    pub const ALL: [EvalMode; 5] = [
        EvalMode::Full,
        EvalMode::WindowOnly,
        EvalMode::Truncate,
        EvalMode::Streaming,
        EvalMode::Beacon,
    ];

    /// The name `--modes` takes and the records carry.
    pub fn name(self) -> &'static str {
        match self {
            EvalMode::Full => "full",
            EvalMode::WindowOnly => "window-only",
            EvalMode::Truncate => "truncate",
            EvalMode::Streaming => "streaming",
            EvalMode::Beacon => "beacon",
        }
    }

    pub fn parse(s: &str) -> Result<EvalMode> {
        EvalMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| {
                format!("unknown mode {s:?} (expected full, window-only, truncate, streaming or beacon)")
            })
    }

    /// Raw-token baselines that keep at most `keep` tokens.
    pub fn keeps_raw_tokens(self) -> bool {
        matches!(self, EvalMode::Truncate | EvalMode::Streaming)
    }
}

impl std::fmt::Display for EvalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One engine configuration under test.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModeSpec {
    pub mode: EvalMode,
    /// Beacon ratio (beacon mode only).
    pub ratio: Option<String>,
    /// K/V tokens kept (truncate/streaming only); None = native window.
    pub keep: Option<usize>,
    pub window: Option<usize>,
    /// Raw tail of beacon runs (None = the model's beacon config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_tail: Option<usize>,
    /// Equal-memory baseline (truncate/streaming): keep what the beacon configuration with this
    /// [`ModeSpec::memory_key`] held at its peak, resolved per length by [`ModeSpec::with_memory`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub equal_memory: Option<String>,
}

/// Sink tokens of the harness's streaming runs (the engine options' default).
pub const STREAMING_SINK: usize = 4;

impl ModeSpec {
    pub fn new(mode: EvalMode, ratio: Option<&str>, keep: Option<usize>) -> Self {
        ModeSpec {
            mode,
            ratio: ratio.map(String::from),
            keep,
            window: None,
            raw_tail: None,
            equal_memory: None,
        }
    }

    /// `+tail128` for a beacon run with a raw tail, else empty.
    fn tail_suffix(&self) -> String {
        match self.raw_tail {
            Some(t) if t > 0 && self.mode == EvalMode::Beacon => format!("+tail{t}"),
            _ => String::new(),
        }
    }

    /// What equal-memory baselines call a beacon run with an integer ratio r > 0: `8`,
    /// `8+tail128` (the `r` of `truncate@xr`); None for other runs.
    pub fn memory_key(&self) -> Option<String> {
        if self.mode != EvalMode::Beacon {
            return None;
        }
        let r = self.ratio.as_deref()?;
        r.parse::<usize>()
            .is_ok_and(|r| r > 0)
            .then(|| format!("{r}{}", self.tail_suffix()))
    }

    /// An equal-memory baseline of `mode` (truncate/streaming) for beacon ratio `ratio`.
    pub fn equal_memory(mode: EvalMode, ratio: &str) -> Self {
        ModeSpec {
            equal_memory: Some(ratio.to_string()),
            ..ModeSpec::new(mode, None, None)
        }
    }

    /// The beacon configuration an equal-memory baseline matches (`beacon-x8`).
    pub fn memory_of(&self) -> Option<String> {
        self.equal_memory.as_ref().map(|r| format!("beacon-x{r}"))
    }

    /// This equal-memory baseline holding `entries` K/V entries in all: truncate reads the last
    /// `entries` tokens; streaming keeps [`STREAMING_SINK`] sink + `entries − sink` recent entries.
    pub fn with_memory(&self, entries: usize) -> ModeSpec {
        let keep = match self.mode {
            EvalMode::Streaming => entries.saturating_sub(STREAMING_SINK),
            _ => entries,
        };
        ModeSpec {
            keep: Some(keep),
            ..self.clone()
        }
    }

    /// Streaming with this few kept entries is not run (the engine evicts in blocks of 64, so such a
    /// "recent window" would mostly hold less than it says).
    pub fn streaming_too_small(&self, native: usize) -> bool {
        self.mode == EvalMode::Streaming && self.keep.unwrap_or(native) <= 64
    }

    /// Short stable name: `full`, `window-only`, `truncate-8192`, `streaming-8192`, `beacon-x8`,
    /// `beacon-adapt`, and the equal-memory baselines `truncate@x8`, `streaming@x8`.
    pub fn label(&self, native: usize) -> String {
        if let Some(r) = &self.equal_memory {
            return format!("{}@x{r}", self.mode);
        }
        match self.mode {
            EvalMode::Beacon => format!(
                "beacon-{}{}",
                match self.ratio.as_deref() {
                    Some(r) if r.chars().all(|c| c.is_ascii_digit()) => format!("x{r}"),
                    Some(r) => r.to_string(),
                    None => "default".into(),
                },
                self.tail_suffix()
            ),
            EvalMode::Truncate | EvalMode::Streaming => {
                format!("{}-{}", self.mode, self.keep.unwrap_or(native))
            }
            m => m.name().to_string(),
        }
    }

    pub fn options(&self, seed: u64) -> EngineOptions {
        EngineOptions {
            mode: Some(self.mode.name().to_string()),
            ratio: self.ratio.clone(),
            keep: self.keep,
            window: self.window,
            sink: None,
            raw_tail: self.raw_tail.filter(|_| self.mode == EvalMode::Beacon),
            seed: Some(seed),
            // The tables in docs/RESULTS.md were measured with f32 K/V.
            kv_dtype: None,
        }
    }

    /// A fresh session for this configuration.
    pub fn session(&self, ev: &Evaluator, seed: u64) -> Result<Session> {
        let o = self.options(seed);
        let cfg = o.beacon_config(&ev.loaded.beacon)?;
        let mode = o.mode_for(ev.native, &cfg)?;
        if self.equal_memory.is_some() && self.keep.is_none() {
            bail!(
                "{}: the equal-memory keep is not resolved (ModeSpec::with_memory)",
                self.label(ev.native)
            );
        }
        let mut s = Session::new(&ev.loaded.model, mode, cfg);
        if self.mode == EvalMode::Streaming {
            // The engine's streaming eviction fails when one prefill chunk (or its 64-entry eviction
            // block) covers all kept entries (nothing left to re-rotate), so chunks stay ≤ keep/2.
            let keep = self.keep.unwrap_or(ev.native);
            if keep <= 64 {
                bail!("streaming needs --keep > 64 (got {keep})");
            }
            s.set_prefill_chunk(s.prefill_chunk().min(keep / 2));
        }
        Ok(s)
    }

    /// Tokens of K/V this configuration keeps at most for raw context (truncate/streaming), else None.
    pub fn keep_limit(&self, native: usize) -> Option<usize> {
        self.mode
            .keeps_raw_tokens()
            .then(|| self.keep.unwrap_or(native))
    }
}

/// Expand `--modes/--ratios/--keep` into configurations, full first (others may reuse its results).
/// The requested context lengths, or the quick/full defaults; sorted, without repeats.
pub fn lengths_or(
    given: &[usize],
    quick: bool,
    quick_default: &[usize],
    full_default: &[usize],
) -> Vec<usize> {
    let mut lengths = if !given.is_empty() {
        given.to_vec()
    } else if quick {
        quick_default.to_vec()
    } else {
        full_default.to_vec()
    };
    lengths.sort_unstable();
    lengths.dedup();
    lengths
}

/// Load the model and expand the requested modes (`default_modes` when none were given).
pub fn load_with_modes(
    common: &CommonArgs,
    modes: &ModeArgs,
    default_modes: &[&str],
) -> Result<(Evaluator, Vec<ModeSpec>)> {
    let ev = Evaluator::load(common)?;
    let mut specs = expand_modes(&with_defaults(modes, default_modes, common.quick))?;
    name_config_tail(&mut specs, &ev.loaded.beacon)?;
    Ok((ev, specs))
}

/// A beacon run without `--raw-tail` takes the model's `beacon_raw_tail` (scaled to a `--window`
/// override as the engine scales it): name it, so the label (`beacon-x8+tail256`) and the
/// equal-memory baselines say what ran. `--raw-tail 0` stays 0.
pub fn name_config_tail(specs: &mut [ModeSpec], base: &beacon::BeaconConfig) -> Result<()> {
    for s in specs.iter_mut().filter(|s| s.mode == EvalMode::Beacon) {
        if s.raw_tail.is_none() && base.raw_tail > 0 {
            let engine = EngineOptions {
                window: s.window,
                ..Default::default()
            };
            s.raw_tail = Some(engine.beacon_config(base)?.raw_tail);
        }
    }
    Ok(())
}

pub fn expand_modes(args: &ModeArgs) -> Result<Vec<ModeSpec>> {
    let mut out = Vec::new();
    let mut modes: Vec<EvalMode> = Vec::new();
    for m in args.modes.iter().map(|m| m.trim().to_lowercase()) {
        if !m.is_empty() {
            let m = EvalMode::parse(&m)?;
            if !modes.contains(&m) {
                modes.push(m);
            }
        }
    }
    // full first: the others may reuse its results
    modes.sort_by_key(|&m| m != EvalMode::Full);
    for &m in &modes {
        match m {
            EvalMode::Full | EvalMode::WindowOnly => out.push(ModeSpec::new(m, None, None)),
            EvalMode::Truncate | EvalMode::Streaming => {
                if args.keep.is_empty() {
                    out.push(ModeSpec::new(m, None, None));
                }
                for &k in &args.keep {
                    out.push(ModeSpec::new(m, None, Some(k)));
                }
            }
            EvalMode::Beacon => {
                if args.ratios.is_empty() {
                    out.push(ModeSpec::new(m, None, None));
                }
                let tails: Vec<Option<usize>> = if args.raw_tails.is_empty() {
                    vec![None]
                } else {
                    args.raw_tails.iter().map(|&t| Some(t)).collect()
                };
                for r in &args.ratios {
                    let r = r.trim();
                    if r.is_empty() {
                        continue;
                    }
                    for &t in &tails {
                        out.push(ModeSpec {
                            raw_tail: t,
                            ..ModeSpec::new(m, Some(r), None)
                        });
                    }
                }
            }
        }
    }
    for s in &mut out {
        if matches!(s.mode, EvalMode::Beacon | EvalMode::WindowOnly) {
            s.window = args.window;
        }
    }
    if out.is_empty() {
        bail!("no modes selected");
    }
    Ok(out)
}

/// Append the equal-memory baselines to `specs` (after every beacon configuration, so their keeps
/// can be measured from the beacon runs): for each integer beacon ratio r > 0, truncate and
/// streaming (those in `specs`, both when neither is) at `@xr`. `flag` is `--equal-memory`; unset, it
/// is `default_on` when beacon and truncate or streaming are both in `specs`.
pub fn with_equal_memory(
    mut specs: Vec<ModeSpec>,
    flag: Option<bool>,
    default_on: bool,
) -> Result<Vec<ModeSpec>> {
    let ratios: Vec<String> = specs.iter().filter_map(ModeSpec::memory_key).collect();
    let mut baselines: Vec<EvalMode> = [EvalMode::Truncate, EvalMode::Streaming]
        .into_iter()
        .filter(|m| specs.iter().any(|s| s.mode == *m))
        .collect();
    let on = flag.unwrap_or(default_on && !ratios.is_empty() && !baselines.is_empty());
    if !on {
        return Ok(specs);
    }
    if ratios.is_empty() {
        bail!("--equal-memory needs beacon among --modes with integer --ratios (e.g. 8,32)");
    }
    if baselines.is_empty() {
        baselines = vec![EvalMode::Truncate, EvalMode::Streaming];
    }
    for r in &ratios {
        for m in &baselines {
            let spec = ModeSpec::equal_memory(*m, r);
            if !specs.contains(&spec) {
                specs.push(spec);
            }
        }
    }
    Ok(specs)
}

/// Resolves equal-memory baselines from the beacon runs of one length (or one prompt): the peak
/// K/V entries each integer ratio held.
#[derive(Debug, Default)]
pub struct MemoryBudgets {
    peaks: Vec<(String, usize)>,
}

impl MemoryBudgets {
    /// Note a finished run of `spec` (only beacon runs count).
    pub fn note(&mut self, spec: &ModeSpec, session: &Session) {
        if let Some(r) = &spec.memory_key() {
            let entries = session.stats().peak_kv_bytes / session.bytes_per_entry().max(1);
            self.peaks.retain(|(q, _)| q != r);
            self.peaks.push((r.clone(), entries));
        }
    }

    /// `spec` with its keep resolved (unchanged unless it is an equal-memory baseline), and the
    /// K/V entries it matches.
    pub fn resolve(&self, spec: &ModeSpec) -> Result<(ModeSpec, Option<usize>)> {
        let Some(r) = &spec.equal_memory else {
            return Ok((spec.clone(), None));
        };
        let entries = self
            .peaks
            .iter()
            .find(|(q, _)| q == r)
            .map(|&(_, e)| e)
            .with_context(|| format!("{}@x{r}: beacon ×{r} has not run first", spec.mode))?;
        Ok((spec.with_memory(entries), Some(entries)))
    }
}

/// Parse a token count: `4096`, `4K`, `4k`, `1M`.
pub fn parse_len(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('k') | Some('K') => (&s[..s.len() - 1], 1024),
        Some('m') | Some('M') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mul)
        .map_err(|_| format!("expected a token count like 4096 or 4K, found {s:?}"))
}

/// `4096` → `4K`.
pub fn fmt_len(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n / 1024)
    } else {
        n.to_string()
    }
}

/// Text ↔ ids: the model's tokenizer, or raw bytes for tokenizer-free models (vocab ≥ 256).
pub enum Tok<'a> {
    Hf(&'a Tokenizer),
    Bytes,
}

impl Tok<'_> {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(match self {
            Tok::Hf(t) => t.encode(text, false)?,
            Tok::Bytes => text.bytes().map(u32::from).collect(),
        })
    }

    /// Encode text that may hold special tokens (chat template pieces).
    pub fn encode_special(&self, text: &str) -> Result<Vec<u32>> {
        Ok(match self {
            Tok::Hf(t) => t.encode(text, true)?,
            Tok::Bytes => text.bytes().map(u32::from).collect(),
        })
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tok::Hf(t) => t.decode(ids).unwrap_or_default(),
            Tok::Bytes => {
                String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>())
                    .into_owned()
            }
        }
    }

    /// The text before and after the user message in the chat template (with the generation prompt),
    /// or None when there is no template.
    pub fn chat_frame(&self) -> Option<(String, String)> {
        let Tok::Hf(t) = self else { return None };
        const MARK: &str = "\u{1}\u{2}USER\u{2}\u{1}";
        let msg = ChatMessage {
            role: "user".into(),
            content: MARK.into(),
        };
        let s = t.apply_chat_template(&[msg], true).ok()?;
        let i = s.find(MARK)?;
        Some((s[..i].to_string(), s[i + MARK.len()..].to_string()))
    }
}

/// A loaded model plus what the harness needs to know about it.
pub struct Evaluator {
    pub loaded: Loaded,
    /// Native context window (max_position_embeddings).
    pub native: usize,
    /// Where the beacon weights came from: `untrained`, `checkpoint`, or the file.
    pub weights: String,
    pub model_path: PathBuf,
    /// How answers are drawn: greedy, with the penalties a subcommand asks for (none by default;
    /// `eval retrieval --dry` turns DRY on).
    pub sampling: beacon::generate::SamplingParams,
}

impl Evaluator {
    /// The beacon window `spec` runs with (also window-only's): its own, else the model's.
    pub fn beacon_window(&self, spec: &ModeSpec) -> usize {
        spec.window.unwrap_or(self.loaded.beacon.window).max(1)
    }

    pub fn load(c: &CommonArgs) -> Result<Self> {
        // The default model comes with the beacons (and settings) shipped for it.
        let loaded = c.model.load().with_context(|| match &c.model.model {
            Some(p) => format!("loading {}", p.display()),
            None => "loading the default model".to_string(),
        })?;
        let path = loaded.path.clone();
        let native = loaded.model.cfg.max_position_embeddings;
        let weights = match &loaded.beacon_source {
            BeaconSource::Initialised => "untrained".to_string(),
            BeaconSource::Checkpoint => "checkpoint".to_string(),
            // The digest names the weights: the shipped path stays the same when they are replaced.
            BeaconSource::File(p) => {
                let digest = beacon::fetch::sha256_file(p)
                    .with_context(|| format!("hashing {}", p.display()))?;
                format!("trained ({}, sha256 {})", p.display(), &digest[..12])
            }
        };
        if loaded.tokenizer.is_none() && loaded.model.cfg.vocab_size < 256 {
            bail!("the model has no tokenizer and fewer than 256 ids: cannot encode text as bytes");
        }
        Ok(Evaluator {
            loaded,
            native,
            weights,
            model_path: path,
            sampling: Default::default(),
        })
    }

    pub fn tok(&self) -> Tok<'_> {
        match &self.loaded.tokenizer {
            Some(t) => Tok::Hf(t),
            None => Tok::Bytes,
        }
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        let mut e = self.loaded.stop_ids();
        if self.loaded.tokenizer.is_none() {
            // Byte models: ids are bytes, and the configured eos is a control byte that plain text never holds.
            e.retain(|&i| i < 32);
        }
        e
    }

    pub fn model_name(&self) -> String {
        self.model_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.model_path.display().to_string())
    }
}

/// Tokens left for the answer when sizing prompts: a case of length L has a prompt of L − 64 tokens.
pub const ANSWER_ROOM: usize = 64;

/// A prompt built from pieces so the long part is tokenized once.
pub struct Prompt {
    pub ids: Vec<u32>,
}

impl Prompt {
    /// `[chat prefix] context question [chat suffix] answer_prefix`; plain text when no chat template
    /// (or `chat` is false).
    pub fn build(
        tok: &Tok,
        chat: bool,
        context: &[u32],
        question: &str,
        answer_prefix: &str,
    ) -> Result<Prompt> {
        let frame = if chat { tok.chat_frame() } else { None };
        let mut ids = Vec::with_capacity(context.len() + 128);
        match frame {
            Some((pre, post)) => {
                ids.extend(tok.encode_special(&pre)?);
                ids.extend_from_slice(context);
                ids.extend(tok.encode(question)?);
                ids.extend(tok.encode_special(&post)?);
                ids.extend(tok.encode(answer_prefix)?);
            }
            None => {
                ids.extend_from_slice(context);
                ids.extend(tok.encode(question)?);
                ids.extend(tok.encode(&format!("\n{answer_prefix}"))?);
            }
        }
        Ok(Prompt { ids })
    }

    /// Tokens to reserve beside a context of this question when sizing a prompt for a target length L:
    /// the frame around the context plus [`ANSWER_ROOM`], so prompt + answer fit in L. (It also keeps the
    /// question off a beacon-window boundary for the usual power-of-two L: a prompt ending exactly where a
    /// window closes would have its question compressed before the first answer token.)
    pub fn overhead(tok: &Tok, chat: bool, question: &str, answer_prefix: &str) -> Result<usize> {
        Ok(Prompt::build(tok, chat, &[], question, answer_prefix)?
            .ids
            .len()
            + ANSWER_ROOM)
    }
}

/// Rows of a logits tensor as f32 vectors.
pub fn logit_rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = t.to_dtype(DType::F32)?;
    let t = if t.rank() == 1 { t.unsqueeze(0)? } else { t };
    Ok(t.to_vec2::<f32>()?)
}

/// Result of one greedy answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub prefill_seconds: f64,
    pub peak_kv_bytes: usize,
}

/// Feed `prompt` into a fresh session and answer greedily: at most `max_new` tokens, stopping at an
/// eos id or (when `stop_newline`) at a newline after some text.
#[allow(clippy::too_many_arguments)]
pub fn answer_greedy(
    ev: &Evaluator,
    session: &mut Session,
    prompt: &[u32],
    max_new: usize,
    stop_newline: bool,
    progress: &mut dyn FnMut(usize),
) -> Result<Answer> {
    let model = &ev.loaded.model;
    let tok = ev.tok();
    let eos = ev.eos_ids();
    let t0 = std::time::Instant::now();
    let mut logits = session
        .feed_with(model, prompt, Want::Last, FeedOptions::default(), progress)?
        .context("the prompt produced no logits")?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let mut sampler = beacon::generate::Sampler::new(ev.sampling.clone()).with_breakers(&eos);
    let mut out = Vec::new();
    while out.len() < max_new {
        let mut rows = logit_rows(&logits)?;
        let next = sampler.pick(rows.pop().context("empty logits")?, session.tokens());
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        if stop_newline {
            let text = tok.decode(&out);
            if text.trim_start().contains('\n') {
                break;
            }
        }
        if out.len() == max_new {
            break;
        }
        logits = session
            .feed(model, &[next], Want::Last)?
            .context("decode step produced no logits")?;
    }
    let mut text = tok.decode(&out);
    if stop_newline {
        let t = text.trim_start();
        if let Some(i) = t.find('\n') {
            text = t[..i].to_string();
        }
    }
    Ok(Answer {
        text: text.trim().to_string(),
        prefill_seconds,
        peak_kv_bytes: session.stats().peak_kv_bytes,
    })
}

/// A progress bar over `total` units (hidden when stderr is not a terminal).
pub fn bar(total: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let style = ProgressStyle::with_template(&format!(
        "{{msg:28}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, eta {{eta}})"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb
}

/// A line of progress output: above the bar on a terminal, plain stderr otherwise (logs).
pub fn say(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// Where the data lives.
pub fn data_dir(c: &CommonArgs) -> Result<PathBuf> {
    if let Some(d) = &c.data {
        return Ok(d.clone());
    }
    if let Ok(d) = std::env::var("BEACON_DATA") {
        return Ok(PathBuf::from(d));
    }
    let mut cands = vec![
        PathBuf::from("../shared/data"),
        PathBuf::from("shared/data"),
    ];
    cands.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    for c in &cands {
        if c.join("README.md").exists() || c.join("books").exists() {
            return Ok(c.clone());
        }
    }
    bail!("data directory not found (tried ../shared/data, shared/data); pass --data DIR or set BEACON_DATA")
}

/// Everything a run writes, under `out/`.
pub struct Output<'a> {
    pub common: &'a CommonArgs,
    /// `ppl`, `needle`, `retrieval`, `efficiency`.
    pub name: &'a str,
    /// The command that reproduces the run.
    pub command: &'a str,
}

#[derive(Serialize)]
struct Meta<'a> {
    command: &'a str,
    seed: u64,
    model: String,
    beacon_weights: &'a str,
    unix_time: u64,
    seconds: f64,
}

impl Output<'_> {
    pub fn json_path(&self) -> PathBuf {
        self.common
            .json
            .clone()
            .unwrap_or_else(|| self.common.out.join(format!("{}.json", self.name)))
    }
    pub fn png_path(&self, suffix: &str) -> PathBuf {
        self.common.out.join(format!("{}{suffix}.png", self.name))
    }

    /// Write the JSON records, the markdown (with the command on top) and the meta file.
    pub fn write<T: Serialize>(
        &self,
        ev: &Evaluator,
        records: &T,
        markdown: &str,
        seconds: f64,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.common.out)
            .with_context(|| format!("creating {}", self.common.out.display()))?;
        let jp = self.json_path();
        if let Some(d) = jp.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        beacon::util::atomic_write(&jp, serde_json::to_string_pretty(records)?.as_bytes())?;
        let md = format!(
            "Command (seed {}, model `{}`, beacon weights: {}):\n\n```\n{}\n```\n\n{}",
            self.common.seed,
            ev.model_name(),
            ev.weights,
            self.command,
            markdown
        );
        beacon::util::atomic_write(
            &self.common.out.join(format!("{}.md", self.name)),
            md.as_bytes(),
        )?;
        let meta = Meta {
            command: self.command,
            seed: self.common.seed,
            model: ev.model_path.display().to_string(),
            beacon_weights: &ev.weights,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            seconds,
        };
        beacon::util::atomic_write(
            &self.common.out.join(format!("{}.meta.json", self.name)),
            serde_json::to_string_pretty(&meta)?.as_bytes(),
        )?;
        eprintln!(
            "wrote {} and {}",
            jp.display(),
            self.common.out.join(format!("{}.md", self.name)).display()
        );
        Ok(())
    }
}

/// A markdown table.
pub fn md_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    s.push_str(&format!("| {} |\n", header.join(" | ")));
    s.push_str(&format!(
        "|{}\n",
        header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
            .collect::<String>()
    ));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// Deterministic per-item seed.
pub fn sub_seed(seed: u64, parts: &[u64]) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 31;
    }
    h
}

/// A stable hash of a string (for per-file seeds).
pub fn str_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
