//! Rust errors → Python exceptions, with the messages the CLI prints.
//!
//! The exception classes live in `beacon/_errors.py` (pure Python, so they can derive from both
//! `BeaconError` and the matching built-in: `FileNotFoundError`, `ValueError`, `OSError`). They are
//! looked up when an error is raised; if that import fails, the built-in exception is raised instead.

use beacon::BeaconError;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyType;

/// Which Python class an error becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A path that does not exist: `beacon.BeaconFileNotFoundError` (a `FileNotFoundError`).
    NotFound,
    /// Another I/O failure: `beacon.BeaconOSError` (an `OSError`).
    Os,
    /// Bad input (arguments, files that do not parse, settings out of range): `beacon.BeaconValueError`.
    Value,
    /// Anything else (numerics, internal errors): `beacon.BeaconError`.
    Other,
}

/// A failure inside a native call, before it becomes a Python exception.
pub enum Fail {
    Beacon(BeaconError),
    Any(anyhow::Error),
    /// A Python exception to re-raise as is (KeyboardInterrupt from `check_signals`).
    Py(PyErr),
    /// An error of ours with its class.
    Msg(Kind, String),
}

impl From<BeaconError> for Fail {
    fn from(e: BeaconError) -> Self {
        Fail::Beacon(e)
    }
}

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Self {
        Fail::Any(e)
    }
}

impl From<candle_core::Error> for Fail {
    fn from(e: candle_core::Error) -> Self {
        Fail::Beacon(BeaconError::Candle(e))
    }
}

impl From<PyErr> for Fail {
    fn from(e: PyErr) -> Self {
        Fail::Py(e)
    }
}

pub fn value(msg: impl Into<String>) -> Fail {
    Fail::Msg(Kind::Value, msg.into())
}

fn io_kind(e: &std::io::Error) -> Kind {
    if e.kind() == std::io::ErrorKind::NotFound {
        Kind::NotFound
    } else {
        Kind::Os
    }
}

fn beacon_kind(e: &BeaconError) -> Kind {
    match e {
        BeaconError::Io { error, .. } => io_kind(error),
        BeaconError::Parse { .. }
        | BeaconError::Config { .. }
        | BeaconError::MissingTensor { .. }
        | BeaconError::Shape { .. }
        | BeaconError::Invalid(_) => Kind::Value,
        // Numerics (candle) and any variant added later.
        _ => Kind::Other,
    }
}

/// The class of an error chain: the first cause we recognise decides.
fn anyhow_kind(e: &anyhow::Error) -> Kind {
    for cause in e.chain() {
        if let Some(b) = cause.downcast_ref::<BeaconError>() {
            return beacon_kind(b);
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io_kind(io);
        }
        if cause.downcast_ref::<clap::Error>().is_some() {
            return Kind::Value;
        }
    }
    Kind::Other
}

/// Build the exception `kind` with `msg`.
pub fn raise(py: Python<'_>, kind: Kind, msg: String) -> PyErr {
    let name = match kind {
        Kind::NotFound => "BeaconFileNotFoundError",
        Kind::Os => "BeaconOSError",
        Kind::Value => "BeaconValueError",
        Kind::Other => "BeaconError",
    };
    let class = py
        .import("beacon._errors")
        .and_then(|m| m.getattr(name))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match class {
        Ok(c) => PyErr::from_type(c, (msg,)),
        Err(_) => match kind {
            Kind::NotFound => PyFileNotFoundError::new_err(msg),
            Kind::Os => PyOSError::new_err(msg),
            Kind::Value => PyValueError::new_err(msg),
            Kind::Other => PyRuntimeError::new_err(msg),
        },
    }
}

impl Fail {
    pub fn into_py(self, py: Python<'_>) -> PyErr {
        match self {
            Fail::Beacon(e) => raise(py, beacon_kind(&e), e.to_string()),
            // `{:#}`: the whole chain on one line, as `beacon` prints it after "error: ".
            Fail::Any(e) => raise(py, anyhow_kind(&e), format!("{e:#}")),
            Fail::Py(e) => e,
            Fail::Msg(kind, msg) => raise(py, kind, msg),
        }
    }
}

impl From<Fail> for PyErr {
    fn from(f: Fail) -> Self {
        Python::attach(|py| f.into_py(py))
    }
}

/// Run `f`, turning a panic into an error instead of letting it cross into Python.
pub fn guard<T>(f: impl FnOnce() -> Result<T, Fail>) -> Result<T, Fail> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Fail::Msg(
                Kind::Other,
                format!("internal error (a bug in beacon, please report it): {what}"),
            ))
        }
    }
}
