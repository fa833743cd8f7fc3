//! beacon — Activation Beacon for long-context inference on candle.
//!
//! Data flow: [`tokenizer`] → ids → [`session::Session`] splits them into windows, asking
//! [`schedule`] for each window's compression ratio → beacons interleaved, positions assigned →
//! [`model::Model::forward`] over `[sink | memory | window]` → the session keeps the window's beacon
//! K/V and drops its raw K/V → logits of the last raw row → [`generate`] samples → the token is fed
//! back through the same session.

pub mod attention;
mod bf16;
#[cfg(feature = "cli")]
pub mod cli_args;
pub mod config;
pub mod context_file;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod loader;
pub mod memory_plan;
pub mod metrics;
pub mod model;
pub mod options;
mod q4_1;
pub mod schedule;
pub mod session;
mod stored_quant;
pub mod testing;
pub mod threads;
pub mod tokenizer;
pub mod util;

pub use config::{BeaconConfig, ModelConfig};
pub use error::{BeaconError, Result};
pub use loader::{load, LoadOptions, Loaded};
pub use session::{Mode, Session, Want};
