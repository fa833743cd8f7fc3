//! End-to-end: a real HTTP client against the server on loopback, with the tiny llama fixture.

mod common;

use common::*;
use serde_json::{json, Value};

fn user_text() -> String {
    // Long enough to close several 32-token windows of the fixture.
    "Tell me everything about the lighthouse keeper who counted ships at night. ".repeat(2)
}

fn assert_usage_and_beacon(v: &Value) {
    let u = &v["usage"];
    let (p, c, t) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap(),
    );
    assert_eq!(p + c, t, "{v}");
    let b = &v["beacon"];
    for key in [
        "ratio",
        "memory_entries",
        "kv_bytes",
        "kv_bytes_full",
        "tokens_encoded",
        "tokens_reused",
    ] {
        assert!(b[key].is_number(), "beacon.{key} missing: {v}");
    }
    assert_eq!(
        b["tokens_encoded"].as_u64().unwrap() + b["tokens_reused"].as_u64().unwrap(),
        p,
        "{v}"
    );
}

#[test]
fn openai_wire_format_stream_and_non_stream() {
    let model = tiny_model();
    let (server, base) = start(ServeArgs {
        cache_bytes: 0,
        ..args(&model)
    });
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": user_text()}]);

    // Chat, non-stream.
    let (status, v) = post(
        &format!("{base}/v1/chat/completions"),
        &chat_body(messages.clone(), 12),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].is_u64());
    assert_eq!(v["model"], "tiny");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(
        ["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()),
        "{v}"
    );
    assert_usage_and_beacon(&v);
    assert!(
        v["beacon"]["memory_entries"].as_u64().unwrap()
            < v["usage"]["prompt_tokens"].as_u64().unwrap(),
        "memory is compressed: {v}"
    );

    // Chat, stream with usage: same text, role first, finish last, usage chunk, [DONE].
    let mut body = chat_body(messages.clone(), 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = post_stream(&format!("{base}/v1/chat/completions"), &body);
    assert_eq!(s.status, 200);
    assert!(s.done, "stream ends with [DONE]");
    assert!(
        s.chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{:?}",
        s.chunks
    );
    assert_eq!(s.chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let n = s.chunks.len();
    let last_choice = &s.chunks[n - 2]["choices"][0];
    assert_eq!(last_choice["finish_reason"], choice["finish_reason"]);
    assert!(s.chunks[..n - 2]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(s.chunks[n - 1]["choices"], json!([]));
    assert_usage_and_beacon(&s.chunks[n - 1]);
    assert_eq!(s.chunks[n - 1]["usage"], v["usage"]);
    assert_eq!(stream_text(&s), text);

    // Completions, both ways.
    let body = json!({"prompt": user_text(), "max_tokens": 10, "temperature": 0, "seed": 3});
    let (status, v) = post(&format!("{base}/v1/completions"), &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    assert_usage_and_beacon(&v);
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let s = post_stream(&format!("{base}/v1/completions"), &sbody);
    assert!(s.done && s.chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(stream_text(&s), v["choices"][0]["text"].as_str().unwrap());
    assert_eq!(
        s.chunks.last().unwrap()["choices"][0]["finish_reason"],
        v["choices"][0]["finish_reason"]
    );

    // Token-id prompts, sampling with a seed is reproducible.
    let body = json!({"prompt": [5, 6, 7, 8, 9], "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 11});
    let (_, a) = post(&format!("{base}/v1/completions"), &body);
    let (_, b) = post(&format!("{base}/v1/completions"), &body);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_eq!(a["usage"]["prompt_tokens"], 5);

    // Models, health, metrics.
    let (status, models) = get(&format!("{base}/v1/models"));
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(get(&format!("{base}/health")).0, 200);
    let (status, m) = get(&format!("{base}/metrics"));
    assert_eq!(status, 200);
    assert!(metric(&m, "beacon_completion_tokens_total") > 0.0);
    assert!(
        m.contains(
            "beacon_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2"
        ),
        "{m}"
    );
    server.shutdown().unwrap();
}

#[test]
fn second_turn_encodes_only_new_tokens_and_matches_a_fresh_run() {
    let model = tiny_model();
    let (reuse, base) = start(args(&model));
    let (fresh, fresh_base) = start(ServeArgs {
        cache_bytes: 0,
        ..args(&model)
    });
    let url = format!("{base}/v1/chat/completions");
    let mut messages = vec![json!({"role": "user", "content": user_text()})];

    let (status, v1) = post(&url, &chat_body(json!(messages), 10));
    assert_eq!(status, 200, "{v1}");
    let mut previous = v1.clone();
    let p1 = v1["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        v1["beacon"]["tokens_encoded"].as_u64().unwrap(),
        p1,
        "first turn encodes everything"
    );
    messages.push(json!({"role": "assistant", "content": v1["choices"][0]["message"]["content"]}));
    messages.push(json!({"role": "user", "content": "And what did he see on the last night?"}));

    for turn in 2..=3 {
        let (status, v) = post(&url, &chat_body(json!(messages), 10));
        assert_eq!(status, 200, "{v}");
        let p = v["usage"]["prompt_tokens"].as_u64().unwrap();
        let encoded = v["beacon"]["tokens_encoded"].as_u64().unwrap();
        // The held memory has seen the previous prompt and the reply's tokens except the last
        // sampled one (never fed when generation stops at max_tokens; an eos is not fed at all).
        let prev_p = previous["usage"]["prompt_tokens"].as_u64().unwrap();
        let prev_c = previous["usage"]["completion_tokens"].as_u64().unwrap();
        let unfed = u64::from(previous["choices"][0]["finish_reason"] == "length");
        assert_eq!(
            encoded,
            p - prev_p - prev_c + unfed,
            "turn {turn}: only the new tokens are encoded: {v}"
        );
        assert!(encoded < p / 2, "turn {turn}: encoded {encoded} of {p}");

        let (_, whole) = post(
            &format!("{fresh_base}/v1/chat/completions"),
            &chat_body(json!(messages), 10),
        );
        assert_eq!(
            whole["beacon"]["tokens_encoded"].as_u64().unwrap(),
            p,
            "the fresh server reads everything"
        );
        assert_eq!(
            v["choices"][0]["message"]["content"], whole["choices"][0]["message"]["content"],
            "turn {turn}: continuing from memory gives the text of one run over the whole conversation"
        );
        assert_eq!(
            v["beacon"]["memory_entries"],
            whole["beacon"]["memory_entries"]
        );
        messages
            .push(json!({"role": "assistant", "content": v["choices"][0]["message"]["content"]}));
        messages.push(json!({"role": "user", "content": format!("Turn {turn}: go on.")}));
        previous = v;
    }

    // The exact same request again: the prompt's end was kept with its logits, nothing to encode.
    messages.truncate(messages.len() - 2);
    let (_, again1) = post(&url, &chat_body(json!(messages), 10));
    let (_, again2) = post(&url, &chat_body(json!(messages), 10));
    assert_eq!(again2["beacon"]["tokens_encoded"], 0, "{again2}");
    assert_eq!(
        again1["choices"][0]["message"]["content"],
        again2["choices"][0]["message"]["content"]
    );

    // A diverging history does not reuse a memory that has seen other tokens.
    let other = json!([{"role": "user", "content": "Something else entirely, about the sea."}]);
    let (_, d) = post(&url, &chat_body(other.clone(), 6));
    assert_eq!(d["beacon"]["tokens_encoded"], d["usage"]["prompt_tokens"]);
    let (_, m) = get(&format!("{base}/metrics"));
    assert!(metric(&m, "beacon_cache_hits_total") >= 3.0, "{m}");
    assert!(metric(&m, "beacon_tokens_reused_total") > 0.0, "{m}");
    reuse.shutdown().unwrap();
    fresh.shutdown().unwrap();
}

#[test]
fn conversations_persist_across_restarts() {
    let model = tiny_model();
    let dir = scratch("persist");
    let messages = json!([{"role": "user", "content": user_text()}]);
    let a = ServeArgs {
        persist_dir: Some(dir.clone()),
        ..args(&model)
    };
    let (server, base) = start(a.clone());
    let (_, first) = post(
        &format!("{base}/v1/chat/completions"),
        &chat_body(messages.clone(), 8),
    );
    server.shutdown().unwrap();
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert!(files >= 1, "held conversations were saved");
    let (server, base) = start(a);
    let (_, again) = post(
        &format!("{base}/v1/chat/completions"),
        &chat_body(messages, 8),
    );
    assert_eq!(
        again["beacon"]["tokens_encoded"], 0,
        "restored from disk: {again}"
    );
    assert_eq!(
        again["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );
    server.shutdown().unwrap();
}

#[test]
fn malformed_requests_get_json_errors_and_the_server_keeps_serving() {
    let model = tiny_model();
    let (server, base) = start(ServeArgs {
        max_body_bytes: 4096,
        max_prompt_tokens: 64,
        max_tokens_limit: 1000,
        ..args(&model)
    });
    let chat = format!("{base}/v1/chat/completions");
    let comp = format!("{base}/v1/completions");
    let msgs = r#"[{"role":"user","content":"hi"}]"#;
    let big = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(10_000)
    );
    let long_prompt = format!(r#"{{"prompt":"{}"}}"#, "y".repeat(200));
    let cases: Vec<(&str, &str, String, u16, Option<&str>)> = vec![
        ("bad JSON", &chat, "{\"messages\": [".into(), 400, None),
        ("not an object", &chat, "[1,2,3]".into(), 400, None),
        (
            "messages wrong type",
            &chat,
            r#"{"messages":"hi"}"#.into(),
            400,
            None,
        ),
        (
            "content wrong type",
            &chat,
            r#"{"messages":[{"role":"user","content":5}]}"#.into(),
            400,
            None,
        ),
        (
            "missing messages",
            &chat,
            r#"{"model":"tiny"}"#.into(),
            400,
            None,
        ),
        (
            "empty messages",
            &chat,
            r#"{"messages":[]}"#.into(),
            400,
            Some("messages"),
        ),
        (
            "bad role",
            &chat,
            r#"{"messages":[{"role":"wizard","content":"hi"}]}"#.into(),
            400,
            Some("messages"),
        ),
        (
            "negative max_tokens",
            &chat,
            format!(r#"{{"messages":{msgs},"max_tokens":-1}}"#),
            400,
            Some("max_tokens"),
        ),
        (
            "zero max_tokens",
            &chat,
            format!(r#"{{"messages":{msgs},"max_tokens":0}}"#),
            400,
            Some("max_tokens"),
        ),
        (
            "huge max_tokens",
            &chat,
            format!(r#"{{"messages":{msgs},"max_tokens":1000000000000}}"#),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens string",
            &chat,
            format!(r#"{{"messages":{msgs},"max_tokens":"ten"}}"#),
            400,
            None,
        ),
        (
            "max_tokens beyond i64",
            &chat,
            format!(r#"{{"messages":{msgs},"max_tokens":1e300}}"#),
            400,
            None,
        ),
        (
            "temperature",
            &chat,
            format!(r#"{{"messages":{msgs},"temperature":7}}"#),
            400,
            Some("temperature"),
        ),
        (
            "top_p",
            &chat,
            format!(r#"{{"messages":{msgs},"top_p":0}}"#),
            400,
            Some("top_p"),
        ),
        (
            "n",
            &chat,
            format!(r#"{{"messages":{msgs},"n":3}}"#),
            400,
            Some("n"),
        ),
        (
            "negative seed",
            &chat,
            format!(r#"{{"messages":{msgs},"seed":-4}}"#),
            400,
            Some("seed"),
        ),
        (
            "stop wrong type",
            &chat,
            format!(r#"{{"messages":{msgs},"stop":7}}"#),
            400,
            None,
        ),
        (
            "unknown model",
            &chat,
            format!(r#"{{"messages":{msgs},"model":"gpt-9"}}"#),
            404,
            Some("model"),
        ),
        ("oversized body", &chat, big, 413, None),
        ("prompt too long", &comp, long_prompt, 400, Some("messages")),
        (
            "empty prompt",
            &comp,
            r#"{"prompt":""}"#.into(),
            400,
            Some("prompt"),
        ),
        (
            "prompt wrong type",
            &comp,
            r#"{"prompt":5}"#.into(),
            400,
            None,
        ),
        (
            "token id out of vocabulary",
            &comp,
            r#"{"prompt":[1,2,99999]}"#.into(),
            400,
            None,
        ),
        (
            "stream with bad input",
            &chat,
            r#"{"messages":[],"stream":true}"#.into(),
            400,
            Some("messages"),
        ),
    ];
    for (name, url, body, want, param) in cases {
        let (status, text) = post_raw(url, body.as_bytes());
        assert_eq!(status, want, "{name}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {text}"));
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {v}"
        );
        assert!(err["type"].is_string(), "{name}: {v}");
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{name}: {v}");
        }
        assert_eq!(
            get(&format!("{base}/health")).0,
            200,
            "{name}: server still serves"
        );
    }
    assert_eq!(get(&format!("{base}/v1/nope")).0, 404);
    // And it still generates.
    let (status, v) = post(
        &chat,
        &chat_body(json!([{"role": "user", "content": "hi"}]), 4),
    );
    assert_eq!(status, 200, "{v}");
    server.shutdown().unwrap();
}

#[test]
fn client_disconnect_cancels_generation() {
    use std::io::{BufRead, BufReader};
    let model = tiny_model();
    let (server, base) = start(ServeArgs {
        cache_bytes: 0,
        ..args(&model)
    });
    let body = json!({"prompt": "Once upon a time", "max_tokens": 90000, "temperature": 0, "stream": true});
    let r = ureq::post(&format!("{base}/v1/completions"))
        .send_string(&body.to_string())
        .unwrap();
    let mut lines = BufReader::new(r.into_reader()).lines();
    let mut seen = 0;
    while seen < 3 {
        if lines.next().unwrap().unwrap().starts_with("data: ") {
            seen += 1;
        }
    }
    drop(lines); // hang up mid-stream
    let t0 = std::time::Instant::now();
    loop {
        let (_, m) = get(&format!("{base}/metrics"));
        if metric(&m, "beacon_cancelled_total") >= 1.0 {
            assert!(metric(&m, "beacon_completion_tokens_total") < 90000.0);
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 30,
            "generation was not cancelled:\n{m}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server.shutdown().unwrap();
}

#[test]
fn sixteen_concurrent_streams_all_complete() {
    let model = tiny_model();
    let (server, base) = start(args(&model));
    let url = format!("{base}/v1/chat/completions");
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut body = chat_body(json!([{"role": "user", "content": format!("Client {i} asks: {}", user_text())}]), 24);
                body["stream"] = json!(true);
                let s = post_stream(&url, &body);
                assert_eq!(s.status, 200);
                assert!(s.done, "client {i}: stream ended with [DONE]");
                (body, stream_text(&s))
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    // Interleaving does not change what a request generates.
    for (mut body, text) in results.into_iter().take(3) {
        body["stream"] = json!(false);
        let (_, v) = post(&url, &body);
        assert_eq!(v["choices"][0]["message"]["content"], text);
    }
    server.shutdown().unwrap();
}
