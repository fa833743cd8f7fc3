//! TEMPORARY stub until tokenizer.rs lands (same API).
use crate::error::{BeaconError, Result};
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage { pub role: String, pub content: String }
pub struct Tokenizer;
pub struct StreamDecoder<'a>(&'a Tokenizer);
impl StreamDecoder<'_> {
    pub fn push(&mut self, id: u32) -> Result<String> { Ok(format!("<{id}>")) }
    pub fn finish(&mut self) -> Result<String> { Ok(String::new()) }
}
impl Tokenizer {
    pub fn from_file(_d: &std::path::Path) -> Result<Self> { Ok(Tokenizer) }
    pub fn from_hf_dir(_d: &std::path::Path) -> Result<Self> { Ok(Tokenizer) }
    pub fn from_gguf(_c: &candle_core::quantized::gguf_file::Content, _s: &str) -> Result<Self> { Ok(Tokenizer) }
    pub fn encode(&self, _t: &str, _p: bool) -> Result<Vec<u32>> { Err(BeaconError::invalid("stub")) }
    pub fn decode(&self, ids: &[u32]) -> Result<String> { Ok(format!("{ids:?}")) }
    pub fn apply_chat_template(&self, _m: &[ChatMessage], _g: bool) -> Result<String> { Err(BeaconError::invalid("stub")) }
    pub fn eos_ids(&self) -> Vec<u32> { vec![] }
    pub fn bos_id(&self) -> Option<u32> { None }
    pub fn vocab_size(&self) -> usize { 0 }
    pub fn id_to_token(&self, _id: u32) -> Option<String> { None }
    pub fn stream_decoder(&self) -> StreamDecoder<'_> { StreamDecoder(self) }
}
