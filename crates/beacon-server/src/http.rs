//! The HTTP layer: routes, body limits, JSON and SSE. It turns requests into engine jobs and engine
//! events into OpenAI responses; it knows nothing of models.

use crate::api::{self, ChatRequest, CompletionRequest, Endpoint, Limits, RequestError, Validated};
use crate::engine::{Done, Engine, Event, Job};
use crate::metrics::Metrics;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub struct AppState {
    pub engine: Arc<Engine>,
    pub model_id: String,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub started: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(
        engine: Arc<Engine>,
        model_id: String,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        AppState {
            engine,
            model_id,
            limits,
            metrics,
            started: unix_now(),
            next_id: AtomicU64::new(1),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error_response(e: &RequestError) -> Response {
    (e.status(), Json(e.body())).into_response()
}

async fn not_found() -> Response {
    let body = json!({"error": {"message": "no such route", "type": "not_found_error", "param": null, "code": null}});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": s.model_id, "object": "model", "created": s.started, "owned_by": "beacon"}],
    }))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let (entries, bytes) = s.engine.cache_stats();
    s.metrics
        .cache_entries
        .store(entries as u64, Ordering::Relaxed);
    s.metrics.cache_bytes.store(bytes as u64, Ordering::Relaxed);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn chat(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let t0 = Instant::now();
    let validated = read_body(&s, body)
        .and_then(|b| api::parse::<ChatRequest>(&b))
        .and_then(|r| r.validate(&s.model_id, &s.limits));
    respond(s, Endpoint::Chat, validated, t0).await
}

async fn completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    let validated = read_body(&s, body)
        .and_then(|b| api::parse::<CompletionRequest>(&b))
        .and_then(|r| r.validate(&s.model_id, &s.limits));
    respond(s, Endpoint::Completions, validated, t0).await
}

fn read_body(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, RequestError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            RequestError::BodyTooLarge {
                limit: s.limits.max_body_bytes,
            }
        } else {
            RequestError::BadJson(rejection.body_text())
        }
    })
}

fn endpoint_name(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Completions => "/v1/completions",
    }
}

async fn respond(
    s: Arc<AppState>,
    endpoint: Endpoint,
    validated: Result<Validated, RequestError>,
    t0: Instant,
) -> Response {
    let name = endpoint_name(endpoint);
    let v = match validated {
        Ok(v) => v,
        Err(e) => {
            s.metrics
                .record_request(name, e.status().as_u16(), t0.elapsed().as_secs_f64());
            return error_response(&e);
        }
    };
    let (tx, mut rx) = unbounded_channel();
    let job = Job {
        prompt: v.prompt,
        max_tokens: v.max_tokens,
        sampling: v.sampling,
        stop: v.stop,
        events: tx,
    };
    // Errors found by the engine before generation starts (prompt too long, busy) are still 4xx.
    let started = match s.engine.submit(job) {
        Err(e) => Err(RequestError::from(e)),
        Ok(()) => match rx.recv().await {
            Some(Event::Started(st)) => Ok(st),
            Some(Event::Failed(e)) => Err(e.into()),
            _ => Err(
                crate::engine::EngineError::Internal("the engine dropped the request".into())
                    .into(),
            ),
        },
    };
    if let Err(e) = started {
        s.metrics
            .record_request(name, e.status().as_u16(), t0.elapsed().as_secs_f64());
        return error_response(&e);
    }
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let id = format!(
        "{prefix}-{}-{}",
        s.started,
        s.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = unix_now();
    if v.stream {
        let stream = sse_stream(s, endpoint, id, created, v.include_usage, rx, t0);
        return Sse::new(stream).into_response();
    }
    // Non-stream: dropping this future (client gone) drops `rx`, which cancels the generation.
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done(done) => {
                s.metrics
                    .record_request(name, 200, t0.elapsed().as_secs_f64());
                return Json(api::response(
                    endpoint,
                    &id,
                    created,
                    &s.model_id,
                    text,
                    &done,
                ))
                .into_response();
            }
            Event::Failed(e) => {
                let e = RequestError::from(e);
                s.metrics
                    .record_request(name, e.status().as_u16(), t0.elapsed().as_secs_f64());
                return error_response(&e);
            }
            Event::Started(_) => {}
        }
    }
    let e = RequestError::from(crate::engine::EngineError::Internal(
        "the engine dropped the request".into(),
    ));
    error_response(&e)
}

/// Engine events → SSE chunks, ending with `data: [DONE]`. When the client goes away axum drops
/// the stream and with it the receiver, which cancels the generation.
fn sse_stream(
    s: Arc<AppState>,
    endpoint: Endpoint,
    id: String,
    created: u64,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
    t0: Instant,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: serde_json::Value| SseEvent::default().data(v.to_string());
    let first = match endpoint {
        Endpoint::Chat => vec![data(api::chunk(
            endpoint,
            &id,
            created,
            &s.model_id,
            None,
            None,
        ))],
        Endpoint::Completions => vec![],
    };
    struct St {
        rx: UnboundedReceiver<Event>,
        finished: bool,
    }
    let body = stream::unfold(
        St {
            rx,
            finished: false,
        },
        move |mut st| {
            let (s, id) = (s.clone(), id.clone());
            async move {
                if st.finished {
                    return None;
                }
                let name = endpoint_name(endpoint);
                loop {
                    let out: Vec<SseEvent> = match st.rx.recv().await {
                        Some(Event::Text(t)) => vec![data(api::chunk(
                            endpoint,
                            &id,
                            created,
                            &s.model_id,
                            Some(&t),
                            None,
                        ))],
                        Some(Event::Started(_)) => continue,
                        Some(Event::Done(done)) => {
                            st.finished = true;
                            s.metrics
                                .record_request(name, 200, t0.elapsed().as_secs_f64());
                            done_events(endpoint, &id, created, &s.model_id, &done, include_usage)
                        }
                        Some(Event::Failed(e)) => {
                            st.finished = true;
                            let e = RequestError::from(e);
                            s.metrics.record_request(
                                name,
                                e.status().as_u16(),
                                t0.elapsed().as_secs_f64(),
                            );
                            vec![data(e.body())]
                        }
                        None => {
                            st.finished = true;
                            vec![]
                        }
                    };
                    return Some((stream::iter(out), st));
                }
            }
        },
    )
    .flatten();
    stream::iter(first)
        .chain(body)
        .chain(stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok)
}

fn done_events(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    done: &Done,
    include_usage: bool,
) -> Vec<SseEvent> {
    let data = |v: serde_json::Value| SseEvent::default().data(v.to_string());
    let mut out = vec![data(api::chunk(
        endpoint,
        id,
        created,
        model,
        None,
        Some(done),
    ))];
    if include_usage {
        out.push(data(api::usage_chunk(endpoint, id, created, model, done)));
    }
    out
}
