//! Streaming detokenization: text released as soon as it is complete.

use super::Tokenizer;
use crate::error::Result;

impl Tokenizer {
    /// An incremental detokenizer for streaming output.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Incremental detokenizer: push ids one at a time, get back only newly completed text.
///
/// Byte-level BPE can split one UTF-8 character over several tokens; text is held back until
/// the character is complete, so no U+FFFD is emitted for an incomplete sequence. Decoding a
/// small window (previous token(s) + new ones) and emitting the difference also keeps decoders
/// that treat the first token specially (e.g. leading-space stripping) correct.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the context window decoded with the pending ids.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text it completes (often empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self
            .tok
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = full.get(prefix.len()..) else {
            return Ok(String::new());
        };
        let new = new.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Only the window from prefix_offset on is ever decoded again.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(new)
    }

    /// Flushes whatever is still held back (an incomplete character becomes U+FFFD) and resets.
    pub fn finish(&mut self) -> Result<String> {
        let out = if self.read_offset < self.ids.len() {
            let prefix = self
                .tok
                .decode(&self.ids[self.prefix_offset..self.read_offset])?;
            let full = self.tok.decode(&self.ids[self.prefix_offset..])?;
            match full.get(prefix.len()..) {
                Some(rest) if full.starts_with(&prefix) => rest.to_string(),
                _ => self.tok.decode(&self.ids[self.read_offset..])?,
            }
        } else {
            String::new()
        };
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(out)
    }
}
