//! Conversation memory held between requests, bounded by a byte budget with LRU eviction.
//!
//! A session cannot be rewound, so what is held is exactly what each memory has seen:
//! - *live* sessions, as a request left them (prompt + generated tokens; the last sampled token is
//!   not fed, and no logits are kept, so one is only reusable by a strictly longer prompt), and
//! - *saved* snapshots taken at the end of a prompt, with that prompt's last logits, so a request
//!   can continue from them even when the next turn re-tokenizes the reply differently or repeats
//!   the prompt exactly.
//!
//! A request continues from the entry whose tokens are the longest prefix of its prompt; a prompt
//! that diverges from every entry starts a fresh session.

use beacon::context_file::Snapshot;
use beacon::model::Model;
use beacon::Session;
use candle_core::Tensor;
use std::path::{Path, PathBuf};

enum Held {
    Live(Session),
    Saved(Snapshot),
}

impl Held {
    fn tokens(&self) -> &[u32] {
        match self {
            Held::Live(s) => s.tokens(),
            Held::Saved(s) => &s.tokens,
        }
    }
}

struct Entry {
    held: Held,
    bytes: usize,
    last_used: u64,
}

/// Where a request's memory came from.
pub struct Reused {
    pub session: Session,
    /// Logits after the session's last token (present when it came from a snapshot).
    pub logits: Option<Tensor>,
    /// Prompt tokens the memory already holds.
    pub tokens: usize,
}

pub struct ConversationCache {
    /// Byte budget. 0 disables the cache.
    budget: usize,
    entries: Vec<Entry>,
    held_bytes: usize,
    clock: u64,
    fingerprint: String,
}

impl ConversationCache {
    pub fn new(budget: usize, fingerprint: &str) -> Self {
        ConversationCache {
            budget,
            entries: Vec::new(),
            held_bytes: 0,
            clock: 0,
            fingerprint: fingerprint.into(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The memory holding the longest prefix of `prompt`: a live session is taken out (it will be
    /// extended), a snapshot is copied into a new session (it stays for other requests).
    pub fn take_longest_prefix(
        &mut self,
        prompt: &[u32],
        model: &Model,
    ) -> beacon::Result<Option<Reused>> {
        let usable = |e: &Entry| {
            let t = e.held.tokens();
            let fits = match e.held {
                // No logits: something must be left to feed.
                Held::Live(_) => t.len() < prompt.len(),
                Held::Saved(ref s) => {
                    t.len() < prompt.len() || (t.len() == prompt.len() && s.logits.is_some())
                }
            };
            !t.is_empty() && fits && prompt.starts_with(t)
        };
        // Longest match; on a tie prefer a live session (no copy).
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| usable(e))
            .max_by_key(|(_, e)| (e.held.tokens().len(), matches!(e.held, Held::Live(_))))
            .map(|(i, _)| i);
        let Some(i) = best else { return Ok(None) };
        self.clock += 1;
        if matches!(self.entries[i].held, Held::Live(_)) {
            let e = self.entries.swap_remove(i);
            self.held_bytes -= e.bytes;
            let Held::Live(session) = e.held else {
                unreachable!("checked above")
            };
            let tokens = session.tokens().len();
            return Ok(Some(Reused {
                session,
                logits: None,
                tokens,
            }));
        }
        let e = &mut self.entries[i];
        e.last_used = self.clock;
        let Held::Saved(snap) = &e.held else {
            unreachable!("checked above")
        };
        Ok(Some(Reused {
            session: snap.restore(model)?,
            logits: snap.logits.clone(),
            tokens: snap.tokens.len(),
        }))
    }

    /// Keep a session as a request left it.
    pub fn put_live(&mut self, session: Session) {
        let bytes = session.kv_bytes_now() + session.tokens().len() * 4;
        self.insert(Held::Live(session), bytes);
    }

    /// Keep a snapshot (taken at the end of a prompt).
    pub fn put_saved(&mut self, snapshot: Snapshot) {
        let bytes = snapshot.bytes();
        self.insert(Held::Saved(snapshot), bytes);
    }

    fn insert(&mut self, held: Held, bytes: usize) {
        if !self.enabled() || bytes > self.budget || held.tokens().is_empty() {
            return;
        }
        // One entry per token sequence; a snapshot (with logits) beats a live session.
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.held.tokens() == held.tokens())
        {
            if matches!(held, Held::Live(_)) && matches!(self.entries[i].held, Held::Saved(_)) {
                self.clock += 1;
                self.entries[i].last_used = self.clock;
                return;
            }
            let old = self.entries.swap_remove(i);
            self.held_bytes -= old.bytes;
        }
        while self.held_bytes + bytes > self.budget {
            let Some((lru, _)) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
            else {
                break;
            };
            let old = self.entries.swap_remove(lru);
            self.held_bytes -= old.bytes;
        }
        self.clock += 1;
        self.held_bytes += bytes;
        self.entries.push(Entry {
            held,
            bytes,
            last_used: self.clock,
        });
    }

    /// Write every held conversation to `dir` in the saved-context format. Returns files written.
    pub fn persist(&self, dir: &Path) -> beacon::Result<usize> {
        std::fs::create_dir_all(dir).map_err(|e| beacon::BeaconError::io(dir, e))?;
        let mut n = 0;
        for e in &self.entries {
            let snap = match &e.held {
                Held::Live(s) => Snapshot::capture(s, &self.fingerprint, None)?,
                Held::Saved(s) => s.clone(),
            };
            let name = beacon::context_file::sha256_hex(
                &snap
                    .tokens
                    .iter()
                    .flat_map(|t| t.to_le_bytes())
                    .collect::<Vec<u8>>(),
            );
            snap.save(&dir.join(format!("conversation-{}.beacon", &name[..16])))?;
            n += 1;
        }
        Ok(n)
    }

    /// Load conversations saved by [`ConversationCache::persist`]; files of another model are skipped
    /// with a warning. Returns (loaded, skipped).
    pub fn restore_dir(&mut self, dir: &Path) -> beacon::Result<(usize, usize)> {
        if !dir.is_dir() {
            return Ok((0, 0));
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| beacon::BeaconError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("beacon"))
            .collect();
        files.sort();
        let (mut loaded, mut skipped) = (0, 0);
        for f in files {
            match Snapshot::load(&f) {
                Ok(s) if s.header.model_fingerprint == self.fingerprint => {
                    self.put_saved(s);
                    loaded += 1;
                }
                Ok(_) => {
                    tracing::warn!("{}: saved with another model; skipped", f.display());
                    skipped += 1;
                }
                Err(e) => {
                    tracing::warn!("{e}; skipped");
                    skipped += 1;
                }
            }
        }
        Ok((loaded, skipped))
    }
}
