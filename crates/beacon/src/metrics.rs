//! Process-level measurements shared by the CLI, benchmarks and the server.

/// Peak resident set size of this process (VmHWM), in bytes; 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

/// Current resident set size (VmRSS), in bytes.
pub fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}

fn proc_status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Human-readable bytes (MiB/GiB).
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// What a run held and cost — the fields (and their order) of `beacon run --stats-json`, shared by
/// the CLI and the Python binding so every mode reports the same numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunStats {
    pub mode: String,
    pub ratio: String,
    pub window: usize,
    pub input_tokens: usize,
    pub windows: usize,
    pub memory_entries: MemoryEntries,
    /// Dtype of the cached K/V (both byte counts are in it).
    pub kv_dtype: String,
    pub kv_bytes: usize,
    pub kv_bytes_full: usize,
    pub prefill_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens: usize,
    pub decode_seconds: f64,
    pub decode_tokens_per_second: f64,
    pub peak_rss_bytes: u64,
    /// How the last generation ended; `None` before the first one.
    pub finish: Option<String>,
}

/// Entries the memory holds at the end, by kind.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryEntries {
    pub sink: usize,
    pub beacon: usize,
    /// Raw entries of the last closed window kept after the beacons (`--raw-tail`).
    pub tail: usize,
    /// Entries of the open window.
    pub raw: usize,
}

impl RunStats {
    /// The statistics of `session` after reading `input_tokens`, with the prefill and decode
    /// `(tokens, seconds)` the caller timed.
    pub fn of(
        session: &crate::Session,
        input_tokens: usize,
        prefill: (usize, f64),
        decode: (usize, f64),
        finish: Option<String>,
    ) -> RunStats {
        let l = session.layout();
        RunStats {
            mode: session.mode().name().into(),
            ratio: session.ratio_label(),
            window: session.beacon_config().window,
            input_tokens,
            windows: session.stats().windows_closed + usize::from(l.window_raw > 0),
            memory_entries: MemoryEntries {
                sink: l.sink,
                beacon: l.beacons,
                tail: l.tail,
                raw: l.window_flags.len(),
            },
            kv_dtype: session.kv_dtype().as_str().into(),
            kv_bytes: session.stats().peak_kv_bytes,
            kv_bytes_full: session.kv_bytes_full(),
            prefill_seconds: prefill.1,
            prefill_tokens_per_second: prefill.0 as f64 / prefill.1.max(1e-9),
            decode_tokens: decode.0,
            decode_seconds: decode.1,
            decode_tokens_per_second: decode.0 as f64 / decode.1.max(1e-9),
            peak_rss_bytes: peak_rss_bytes(),
            finish,
        }
    }
}
