//! A bounded load run on loopback: N concurrent streaming chat clients, each sending R requests
//! with distinct prompts (no reuse), against a server started in this process.
//!
//! ```text
//! cargo run --release -p beacon-server --example load -- [--model PATH|tiny] [--clients 16]
//!     [--requests 2] [--max-tokens 32] [--prompt-words 120]
//! ```
//! Prints throughput, latency and time-to-first-token percentiles, and errors.

#[path = "../tests/common/mod.rs"]
mod common;

use serde_json::json;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

struct Sample {
    latency: f64,
    first_token: f64,
    completion_tokens: u64,
    prompt_tokens: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const WORDS: &[&str] = &[
    "the", "keeper", "counted", "ships", "at", "night", "while", "storms", "rolled", "over", "a",
    "quiet", "harbour", "and", "lamps", "burned", "low", "in", "every", "window", "of", "town",
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model: String = arg(&args, "--model", String::new());
    let clients: usize = arg(&args, "--clients", 16);
    let requests: usize = arg(&args, "--requests", 2);
    let max_tokens: usize = arg(&args, "--max-tokens", 32);
    let prompt_words: usize = arg(&args, "--prompt-words", 120);
    let model_path = match model.as_str() {
        "" => beacon::fetch::default_model_path()?,
        "tiny" => common::tiny_model(),
        p => p.into(),
    };
    let serve = beacon_server::ServeArgs {
        model: beacon::cli_args::ModelArgs {
            model: Some(model_path.clone()),
            ..Default::default()
        },
        port: 0,
        served_model_name: Some("m".into()),
        concurrency: clients,
        ..Default::default()
    };
    let server = beacon_server::spawn(serve)?;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    println!("model {} · {clients} clients × {requests} requests · max_tokens {max_tokens} · ~{prompt_words} words per prompt", model_path.display());

    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
                let mut out: Vec<Result<Sample, String>> = Vec::new();
                for r in 0..requests {
                    let text: Vec<&str> = (0..prompt_words).map(|i| WORDS[(i * 7 + c * 13 + r * 5) % WORDS.len()]).collect();
                    let body = json!({
                        "model": "m",
                        "messages": [{"role": "user", "content": format!("Client {c}, request {r}: {}", text.join(" "))}],
                        "max_tokens": max_tokens, "temperature": 0, "stream": true,
                        "stream_options": {"include_usage": true},
                    });
                    let start = Instant::now();
                    let resp = match agent.post(&url).send_string(&body.to_string()) {
                        Ok(r) => r,
                        Err(e) => {
                            out.push(Err(e.to_string()));
                            continue;
                        }
                    };
                    let (mut first, mut usage, mut done) = (None, None, false);
                    for line in BufReader::new(resp.into_reader()).lines() {
                        let Ok(line) = line else { break };
                        let Some(data) = line.strip_prefix("data: ") else { continue };
                        if data == "[DONE]" {
                            done = true;
                            break;
                        }
                        let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
                        if first.is_none() && v["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()) {
                            first = Some(start.elapsed().as_secs_f64());
                        }
                        if v["usage"].is_object() {
                            usage = Some(v["usage"].clone());
                        }
                        if v["error"].is_object() {
                            out.push(Err(v["error"]["message"].to_string()));
                        }
                    }
                    let latency = start.elapsed().as_secs_f64();
                    match (done, usage) {
                        (true, Some(u)) => out.push(Ok(Sample {
                            latency,
                            first_token: first.unwrap_or(latency),
                            completion_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
                            prompt_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
                        })),
                        _ => out.push(Err("stream ended without usage and [DONE]".into())),
                    }
                }
                out
            })
        })
        .collect();
    let results: Vec<Result<Sample, String>> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    let wall = t0.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let mut lat: Vec<f64> = ok.iter().map(|s| s.latency).collect();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.first_token).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    ttft.sort_by(|a, b| a.total_cmp(b));
    let gen: u64 = ok.iter().map(|s| s.completion_tokens).sum();
    let prompt: u64 = ok.iter().map(|s| s.prompt_tokens).sum();
    println!(
        "requests {} ok, {} errors in {wall:.1} s",
        ok.len(),
        errors.len()
    );
    println!(
        "throughput: {:.2} req/s, {:.1} generated tok/s, {:.1} prompt tok/s",
        ok.len() as f64 / wall,
        gen as f64 / wall,
        prompt as f64 / wall
    );
    println!(
        "latency p50 {:.2} s, p99 {:.2} s; first token p50 {:.2} s, p99 {:.2} s",
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        percentile(&ttft, 50.0),
        percentile(&ttft, 99.0)
    );
    println!(
        "prompt tokens {prompt}, generated tokens {gen}; peak RSS {}",
        beacon::metrics::human_bytes(beacon::metrics::peak_rss_bytes())
    );
    for e in errors.iter().take(5) {
        println!("error: {e}");
    }
    server.shutdown()?;
    anyhow::ensure!(errors.is_empty(), "{} requests failed", errors.len());
    Ok(())
}
