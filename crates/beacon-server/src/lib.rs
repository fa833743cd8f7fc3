//! beacon-server — an OpenAI-compatible HTTP API over the beacon engine.
//!
//! Three layers (see `docs/ARCHITECTURE.md`):
//! - [`http`] + [`api`]: routes, body limits, the OpenAI wire format, SSE; knows nothing of models.
//! - [`engine`]: a bounded request queue, worker threads that take turns on the one model step by
//!   step (round-robin), and the [`cache`] of conversation memories reused across requests.
//! - the `beacon` library: sessions, generation, saved contexts.
//!
//! Also here: `beacon compress` ([`compress`]), which writes a saved context.

pub mod api;
pub mod cache;
pub mod compress;
pub mod engine;
pub mod http;
pub mod metrics;

pub use compress::{run_compress, CompressArgs};

use anyhow::Context;
use beacon::cli_args::{EngineArgs, ModelArgs, PenaltyArgs};
use beacon::Loaded;
use engine::{Engine, EngineSettings};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// `beacon serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Defaults of requests that set no `repetition_penalty` / `dry_*` fields: DRY is on
    /// (`--dry-multiplier 0` turns it off).
    #[command(flatten)]
    pub penalties: PenaltyArgs,
    /// Address to listen on. Default: loopback only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 = any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Model id reported by /v1/models and accepted in requests. Default: the model's file or directory name.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Byte budget of conversation memories kept for reuse (LRU), e.g. `1GiB`, `512MiB`, `0` = off.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub cache_bytes: u64,
    /// Save held conversations here at shutdown (saved-context files) and reload them at start.
    #[arg(long)]
    pub persist_dir: Option<PathBuf>,
    /// Largest request body.
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    pub max_body_bytes: u64,
    /// Largest prompt, in tokens.
    #[arg(long, default_value_t = 131_072)]
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// `max_tokens` of a request that gives none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Requests generated at once (they take turns on the model step by step).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Requests that may wait beyond those; more get 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
}

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs {
            model: ModelArgs::default(),
            engine: EngineArgs::default(),
            penalties: PenaltyArgs::default(),
            host: "127.0.0.1".into(),
            port: 8080,
            served_model_name: None,
            cache_bytes: 1 << 30,
            persist_dir: None,
            max_body_bytes: 16 << 20,
            max_prompt_tokens: 131_072,
            max_tokens_limit: 4096,
            default_max_tokens: 256,
            concurrency: 16,
            queue: 64,
        }
    }
}

/// `512`, `64KiB`, `512MiB`, `1GiB` (also KB/MB/GB as powers of 1024, and `k`/`m`/`g`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a size such as 512MiB or 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use B, KiB, MiB or GiB)"
            ))
        }
    };
    Ok((n * mult as f64) as u64)
}

/// A running server (for embedding and tests): its address, and a way to stop it.
pub struct ServerHandle {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl ServerHandle {
    /// Graceful shutdown: stop accepting, finish in-flight responses, stop the engine.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

struct Prepared {
    state: Arc<http::AppState>,
    engine: Arc<Engine>,
    listener: std::net::TcpListener,
}

fn prepare(args: &ServeArgs) -> anyhow::Result<Prepared> {
    // Checked before the model loads.
    let defaults = args
        .penalties
        .greedy(true)
        .context("--repeat-penalty / --dry-*")?;
    let loaded = args.model.load().context("loading the model")?;
    let path = loaded.path.clone();
    let Loaded {
        model,
        beacon: beacon_cfg,
        tokenizer,
        fingerprint,
        ..
    } = loaded;
    let tokenizer = tokenizer.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the model has no tokenizer (put tokenizer.json beside it)",
            path.display()
        )
    })?;
    let options = args.engine.options();
    let beacon = options.beacon_config(&beacon_cfg)?;
    let settings = EngineSettings {
        // window-only takes its window and sink from the beacon settings, as in `beacon run`
        mode: options.mode_for(model.cfg.max_position_embeddings, &beacon)?,
        beacon,
        kv_dtype: options.kv_dtype()?,
        cache_bytes: args.cache_bytes as usize,
        persist_dir: args.persist_dir.clone(),
        max_prompt_tokens: args.max_prompt_tokens,
        workers: args.concurrency,
        queue: args.queue,
    };
    let model_id = args.served_model_name.clone().unwrap_or_else(|| {
        let stem = if path.is_dir() {
            path.file_name()
        } else {
            path.file_stem()
        };
        stem.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "beacon".into())
    });
    let metrics = Arc::new(metrics::Metrics::default());
    let engine = Arc::new(Engine::start(
        model,
        tokenizer,
        fingerprint,
        settings,
        metrics.clone(),
    )?);
    let limits = api::Limits {
        max_body_bytes: args.max_body_bytes as usize,
        max_tokens: args.max_tokens_limit,
        default_max_tokens: args.default_max_tokens.min(args.max_tokens_limit),
        default_repetition_penalty: defaults.repetition_penalty,
        default_dry: defaults.dry,
    };
    let state = Arc::new(http::AppState::new(
        engine.clone(),
        model_id,
        limits,
        metrics,
    ));
    let addr = format!("{}:{}", args.host, args.port);
    let listener = std::net::TcpListener::bind(&addr).with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(Prepared {
        state,
        engine,
        listener,
    })
}

async fn serve_prepared(
    p: Prepared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(p.listener)?;
    tracing::info!(
        "serving {} on http://{}",
        p.state.model_id,
        listener.local_addr()?
    );
    axum::serve(listener, http::router(p.state))
        .with_graceful_shutdown(shutdown)
        .await?;
    // The server is closed; running jobs finish, then held conversations are saved if asked.
    let engine = p.engine;
    tokio::task::spawn_blocking(move || engine.shutdown()).await??;
    Ok(())
}

/// Serve until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let p = tokio::task::block_in_place(|| prepare(&args))?;
    serve_prepared(p, shutdown_signal()).await
}

/// `beacon serve`: build a runtime and serve until Ctrl-C or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let p = prepare(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve_prepared(p, shutdown_signal()))
}

/// Start a server on a background thread; returns once it is listening.
pub fn spawn(args: ServeArgs) -> anyhow::Result<ServerHandle> {
    let p = prepare(&args)?;
    let addr = p.listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("beacon-http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(serve_prepared(p, async {
                let _ = rx.await;
            }))
        })?;
    Ok(ServerHandle {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("1.5k"), Ok(1536));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
