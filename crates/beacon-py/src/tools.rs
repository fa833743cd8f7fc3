//! `beacon train` and `beacon eval ppl` from Python: the same argument parser, the same code, the same
//! files written. The Python side turns keyword arguments into flags.

use crate::errors::{guard, Fail};
use clap::Parser;
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;
use std::sync::atomic::Ordering;

#[derive(Parser, Debug)]
#[command(name = "beacon train")]
struct TrainCli {
    #[command(flatten)]
    args: beacon_train::TrainArgs,
}

/// Saved signal dispositions, put back on drop (the trainer installs its own SIGINT/SIGTERM handler,
/// which would otherwise replace Python's for the rest of the process).
struct SavedHandlers([(libc::c_int, libc::sigaction); 2]);

impl SavedHandlers {
    fn save() -> Self {
        let get = |sig| {
            // SAFETY: reads the current disposition of `sig` into a zeroed struct.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut old);
                (sig, old)
            }
        };
        SavedHandlers([get(libc::SIGINT), get(libc::SIGTERM)])
    }
}

impl Drop for SavedHandlers {
    fn drop(&mut self) {
        for (sig, old) in &self.0 {
            // SAFETY: restores a disposition read by `sigaction` above.
            unsafe {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
    }
}

/// Run `beacon train ARGS…`. Ctrl-C finishes the current update, writes a checkpoint and exports,
/// as the CLI does, then raises `KeyboardInterrupt`.
#[pyfunction]
pub fn train(py: Python<'_>, args: Vec<String>) -> PyResult<()> {
    let cli = TrainCli::try_parse_from(std::iter::once("beacon train".to_string()).chain(args))
        .map_err(|e| Fail::Any(anyhow::Error::from(e)).into_py(py))?;
    beacon_train::trainer::STOP.store(false, Ordering::SeqCst);
    let saved = SavedHandlers::save();
    let r = py.detach(|| guard(|| Ok(beacon_train::run(cli.args)?)));
    drop(saved);
    r.map_err(|f| f.into_py(py))?;
    if beacon_train::trainer::STOP.swap(false, Ordering::SeqCst) {
        return Err(PyKeyboardInterrupt::new_err(
            "training stopped by a signal (checkpoint written)",
        ));
    }
    Ok(())
}

/// Run `beacon eval ppl ARGS…`; returns the records (JSON) it also writes under `--out`.
#[pyfunction]
pub fn eval_ppl(py: Python<'_>, args: Vec<String>) -> PyResult<String> {
    let argv: Vec<String> = ["beacon eval".to_string(), "ppl".to_string()]
        .into_iter()
        .chain(args.iter().cloned())
        .collect();
    let cli = beacon_eval::EvalCli::try_parse_from(argv)
        .map_err(|e| Fail::Any(anyhow::Error::from(e)).into_py(py))?;
    let beacon_eval::EvalCommand::Ppl(a) = cli.cmd else {
        return Err(Fail::Msg(crate::errors::Kind::Other, "not a ppl command".into()).into_py(py));
    };
    let command = format!("beacon eval ppl {}", beacon_eval::shell_join(&args));
    let records = py
        .detach(|| guard(|| Ok(beacon_eval::ppl::run(&a, &command)?)))
        .map_err(|f| f.into_py(py))?;
    serde_json::to_string(&records).map_err(|e| Fail::Any(e.into()).into_py(py))
}
