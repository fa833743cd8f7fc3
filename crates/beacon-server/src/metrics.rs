//! Prometheus counters and gauges, rendered in the text exposition format at `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the request-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Default)]
pub struct Metrics {
    /// Requests waiting in the queue.
    pub queued: AtomicUsize,
    /// Requests being generated.
    pub running: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub tokens_encoded: AtomicU64,
    pub tokens_reused: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub prefill_seconds_micros: AtomicU64,
    pub decode_seconds_micros: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub cache_entries: AtomicU64,
    pub cancelled: AtomicU64,
    /// (endpoint, status) → count.
    requests: Mutex<Vec<(String, u16, u64)>>,
    /// Cumulative bucket counts, sum (µs) and count of request latencies.
    latency: Mutex<([u64; LATENCY_BUCKETS.len()], u64, u64)>,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16, seconds: f64) {
        let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        match r.iter_mut().find(|(e, s, _)| e == endpoint && *s == status) {
            Some(row) => row.2 += 1,
            None => r.push((endpoint.to_string(), status, 1)),
        }
        drop(r);
        let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        for (i, &b) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= b {
                l.0[i] += 1;
            }
        }
        l.1 += (seconds * 1e6) as u64;
        l.2 += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let secs = |a: &AtomicU64| format!("{}", a.load(Ordering::Relaxed) as f64 / 1e6);
        metric(
            "beacon_queue_depth",
            "gauge",
            "Requests waiting for a worker.",
            self.queued.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "beacon_requests_running",
            "gauge",
            "Requests being generated.",
            self.running.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "beacon_prompt_tokens_total",
            "counter",
            "Prompt tokens of all requests.",
            n(&self.prompt_tokens),
        );
        metric(
            "beacon_tokens_encoded_total",
            "counter",
            "Prompt tokens run through the model.",
            n(&self.tokens_encoded),
        );
        metric(
            "beacon_tokens_reused_total",
            "counter",
            "Prompt tokens continued from held memory.",
            n(&self.tokens_reused),
        );
        metric(
            "beacon_completion_tokens_total",
            "counter",
            "Generated tokens.",
            n(&self.completion_tokens),
        );
        metric(
            "beacon_prefill_seconds_total",
            "counter",
            "Time spent encoding prompts (includes waiting for turns).",
            secs(&self.prefill_seconds_micros),
        );
        metric(
            "beacon_decode_seconds_total",
            "counter",
            "Time spent generating (includes waiting for turns).",
            secs(&self.decode_seconds_micros),
        );
        metric(
            "beacon_cache_hits_total",
            "counter",
            "Requests continued from held memory.",
            n(&self.cache_hits),
        );
        metric(
            "beacon_cache_misses_total",
            "counter",
            "Requests started from an empty memory.",
            n(&self.cache_misses),
        );
        metric(
            "beacon_cache_bytes",
            "gauge",
            "Bytes of held conversation memory.",
            n(&self.cache_bytes),
        );
        metric(
            "beacon_cache_entries",
            "gauge",
            "Held conversation memories.",
            n(&self.cache_entries),
        );
        metric(
            "beacon_cancelled_total",
            "counter",
            "Requests cancelled because the client went away.",
            n(&self.cancelled),
        );
        let _ = writeln!(out, "# HELP beacon_http_requests_total HTTP requests by endpoint and status.\n# TYPE beacon_http_requests_total counter");
        for (endpoint, status, count) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "beacon_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {count}"
            );
        }
        let l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP beacon_request_seconds Time from request to the last byte of the response.\n# TYPE beacon_request_seconds histogram");
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "beacon_request_seconds_bucket{{le=\"{b}\"}} {}",
                l.0[i]
            );
        }
        let _ = writeln!(out, "beacon_request_seconds_bucket{{le=\"+Inf\"}} {}", l.2);
        let _ = writeln!(
            out,
            "beacon_request_seconds_sum {}\nbeacon_request_seconds_count {}",
            l.1 as f64 / 1e6,
            l.2
        );
        out
    }
}
